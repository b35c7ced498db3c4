// The Python module faim_kernels._C. It holds no Python functions: importing it runs the
// TORCH_LIBRARY registrations of the other translation units, and the ops are then reached as
// torch.ops.faim_kernels.* (the dispatcher, torch.compile and opcheck understand them).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
    static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
    return PyModule_Create(&module_def);
}
}
