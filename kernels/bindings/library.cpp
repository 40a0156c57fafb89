// The progan_fast_native library: every op's schema, and the Python extension module
// progan_fast._C whose import loads the library. Each op's CPU and CUDA implementations register
// themselves for these schemas in that op's glue, kernels/bindings/<op>.cpp (TORCH_LIBRARY_IMPL
// blocks in several translation units add to the one TORCH_LIBRARY here, in any load order).
// Autograd and fake tensors are registered in Python, next to the Triton backend that shares the
// formulas: progan_fast/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(progan_fast_native, m) {
  // pixel_norm
  m.def("pixel_norm(Tensor x, float eps) -> Tensor");
  m.def("pixel_norm_backward(Tensor grad, Tensor x, float eps) -> Tensor");
  // conv_act: the fused epilogue on a conv output, and the whole layer (conv + epilogue)
  m.def("conv_epilogue(Tensor conv, Tensor? bias, float scale, bool activation, bool pixel_norm) -> (Tensor, Tensor)");
  m.def("conv_epilogue_backward(Tensor grad, Tensor y, Tensor r, bool activation, bool pixel_norm) -> "
        "(Tensor, Tensor)");
  m.def("conv2d_bias_lrelu(Tensor x, Tensor weight, Tensor? bias, float scale, bool activation, bool upsample, "
        "bool pixel_norm) -> (Tensor, Tensor)");
  m.def("conv2d_bias_lrelu_backward(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor y, Tensor r, "
        "float scale, bool activation, bool upsample, bool pixel_norm) -> (Tensor, Tensor, Tensor)");
  // fade_in (G's upsample-blend) and fade_reals (the reals' fade)
  m.def("fade_in(Tensor low, Tensor high, Tensor alpha) -> Tensor");
  m.def("fade_in_backward(Tensor grad, Tensor alpha) -> (Tensor, Tensor)");
  m.def("fade_reals(Tensor x, Tensor alpha) -> Tensor");
  // blend
  m.def("blend(Tensor old, Tensor new, Tensor alpha) -> Tensor");
  m.def("blend_backward(Tensor grad, Tensor alpha) -> (Tensor, Tensor)");
  // downsample2x
  m.def("downsample2x(Tensor x) -> Tensor");
  m.def("downsample2x_backward(Tensor grad, int height, int width) -> Tensor");
  // minibatch_stddev
  m.def("minibatch_stddev(Tensor x, int group_size, float eps) -> Tensor");
  m.def("minibatch_stddev_backward(Tensor grad, Tensor x, int group_size, float eps) -> Tensor");
}

// A plain Python extension module (no pybind11: it only has to load the library, which registers
// the ops). WITH_CUDA tells progan_fast.ops._native whether CUDA kernels were compiled in.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "progan_fast native ops", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef PROGAN_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
