// The Python module `lorafa_ext._C`: importing it loads this library, whose static initialisers
// register the ops. It defines no Python functions (built for setup.py only; CMake builds without it).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
