// The dispatcher's memo keys for a warm call, read in C++ (core/hotpath.py builds and loads this).
//
// Each function mirrors one spec's Python ``fast_key`` (core/ops/<op>.py) and draws the same
// distinctions, with the grad mark the dispatcher adds for a differentiable op: two calls get equal
// keys only when the Python key (and grad mark) are equal for them too. It reads the tensors'
// metadata straight from their TensorImpl. In Python that is a dozen attribute getters, each through
// its own code in libtorch_python; right after a kernel that streamed megabytes through the caches
// they ran about 10 us, against about 2 us here.
//
// A function returns None where the Python key does (a mask, a seed, a layout verify must name), and
// also for anything it does not read itself: a tensor subclass (its Python attributes may differ from
// its TensorImpl), a nested tensor, symbolic sizes. Such a call takes the dispatcher's full path.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

PyObject* s_attn_mask;
PyObject* s_causal;
PyObject* s_scale;
PyObject* s_return_lse;
PyObject* s_seed;
PyObject* s_dtype;
PyObject* s_rounding;
PyObject* s_scaling;
PyObject* s_saturate;
PyObject* s_margin;

// Python's ``n if n <= 1 else 1 << (n - 1).bit_length()``.
int64_t bucket(int64_t n) { return n <= 1 ? n : int64_t(1) << (64 - __builtin_clzll(uint64_t(n - 1))); }

// A plain tensor (torch.Tensor or Parameter) whose sizes this code may read, else nullptr.
const at::Tensor* plain(PyObject* o) {
  if (!THPVariable_CheckExact(o)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(o);
  if (!t.defined() || t.is_nested() || t.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return nullptr;
  return &t;
}

// The key's items, appended in order; the tuple is made once at the end.
struct Items {
  PyObject* v[40];
  int n = 0;
  bool ok = true;
  void own(PyObject* o) {
    if (o == nullptr) ok = false;
    if (n < 40) v[n++] = o; else { Py_XDECREF(o); ok = false; }
  }
  void ref(PyObject* o) { Py_INCREF(o); own(o); }
  void num(int64_t x) { own(PyLong_FromLongLong(x)); }
  void object(PyObject* o) { ref(reinterpret_cast<PyObject*>(Py_TYPE(o))); ref(o); }  // its exact type, then it
  PyObject* tuple() {
    PyObject* t = ok ? PyTuple_New(n) : nullptr;
    for (int i = 0; i < n; ++i) {
      if (t) PyTuple_SET_ITEM(t, i, v[i]); else Py_XDECREF(v[i]);
    }
    n = 0;
    return t;
  }
  ~Items() {  // only where an accessor threw before tuple()
    for (int i = 0; i < n; ++i) Py_XDECREF(v[i]);
  }
};

int64_t device_code(const at::Tensor& t) {
  auto d = t.device();
  return (int64_t(d.type()) << 16) | int64_t(d.index() + 1);
}

// attention_key(args, attrs): args (q, k, v); attrs every attribute, bound.
PyObject* attention_key(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  if (nargs != 2 || !PyTuple_CheckExact(a[0]) || !PyDict_CheckExact(a[1]) || PyTuple_GET_SIZE(a[0]) != 3)
    Py_RETURN_NONE;
  PyObject* attrs = a[1];
  PyObject* mask = PyDict_GetItemWithError(attrs, s_attn_mask);
  PyObject* causal = PyDict_GetItemWithError(attrs, s_causal);
  PyObject* scale = PyDict_GetItemWithError(attrs, s_scale);
  PyObject* lse = PyDict_GetItemWithError(attrs, s_return_lse);
  if (PyErr_Occurred()) return nullptr;
  if (mask != Py_None || !causal || !scale || !lse) Py_RETURN_NONE;
  PyObject* obj[3];
  const at::Tensor* t[3];
  for (int i = 0; i < 3; ++i) {
    obj[i] = PyTuple_GET_ITEM(a[0], i);
    t[i] = plain(obj[i]);
    if (t[i] == nullptr || t[i]->dim() != 4) Py_RETURN_NONE;
  }
  Items key;
  bool grad = false;
  for (int i = 0; i < 3; ++i) key.ref(reinterpret_cast<PyObject*>(Py_TYPE(obj[i])));
  for (int i = 0; i < 3; ++i) key.num(int64_t(t[i]->scalar_type()));
  for (int i = 0; i < 3; ++i) key.num(device_code(*t[i]));
  for (int i = 0; i < 3; ++i) key.num(int64_t(t[i]->layout()));
  for (int i = 0; i < 3; ++i) {
    auto s = t[i]->sizes();
    key.num(s[0]);
    key.num(s[1]);
    key.num(i < 2 ? bucket(s[2]) : int64_t(s[2] == t[1]->sizes()[2]));  // v: only whether Lv == Lk
    key.num(s[3]);
    grad = grad || t[i]->requires_grad();
  }
  key.object(causal);
  key.object(scale);
  key.object(lse);
  key.ref(grad && at::GradMode::is_enabled() ? Py_True : Py_False);
  return key.tuple();
}

// precision_cast_key(args, attrs): args (x,); attrs every attribute, bound.
PyObject* precision_cast_key(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  if (nargs != 2 || !PyTuple_CheckExact(a[0]) || !PyDict_CheckExact(a[1]) || PyTuple_GET_SIZE(a[0]) != 1)
    Py_RETURN_NONE;
  PyObject* attrs = a[1];
  PyObject* seed = PyDict_GetItemWithError(attrs, s_seed);
  PyObject* dtype = PyDict_GetItemWithError(attrs, s_dtype);
  PyObject* rounding = PyDict_GetItemWithError(attrs, s_rounding);
  PyObject* scaling = PyDict_GetItemWithError(attrs, s_scaling);
  PyObject* saturate = PyDict_GetItemWithError(attrs, s_saturate);
  PyObject* margin = PyDict_GetItemWithError(attrs, s_margin);
  if (PyErr_Occurred()) return nullptr;
  if (seed != Py_None || !dtype || !rounding || !scaling || !saturate || !margin) Py_RETURN_NONE;
  PyObject* obj = PyTuple_GET_ITEM(a[0], 0);
  const at::Tensor* t = plain(obj);
  if (t == nullptr || t->layout() != at::kStrided) Py_RETURN_NONE;
  Items key;
  key.ref(reinterpret_cast<PyObject*>(Py_TYPE(obj)));
  key.num(int64_t(t->scalar_type()));
  key.num(device_code(*t));
  key.num(t->is_contiguous() ? 1 : 0);
  key.num(bucket(t->numel()));
  key.ref(dtype);
  key.ref(rounding);
  key.ref(scaling);
  key.object(saturate);
  key.object(margin);
  return key.tuple();
}

template <PyObject* (*F)(PyObject*, PyObject* const*, Py_ssize_t)>
PyObject* guarded(PyObject* self, PyObject* const* a, Py_ssize_t n) {
  try {
    return F(self, a, n);
  } catch (...) {  // a c10::Error from an accessor: no key, the full path will say what is wrong
    PyErr_Clear();
    Py_RETURN_NONE;
  }
}

PyMethodDef methods[] = {
    {"attention_key", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&guarded<attention_key>)),
     METH_FASTCALL, "The attention memo key of a warm call (mirrors core.ops.attention._fast_key, grad mark included)."},
    {"precision_cast_key", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&guarded<precision_cast_key>)),
     METH_FASTCALL, "The precision_cast memo key of a warm call (mirrors core.ops.precision_cast._fast_key)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "switchyard_hotpath", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_switchyard_hotpath(void) {
  PyObject** names[] = {&s_attn_mask, &s_causal, &s_scale, &s_return_lse, &s_seed,
                        &s_dtype,     &s_rounding, &s_scaling, &s_saturate, &s_margin};
  const char* text[] = {"attn_mask", "causal", "scale", "return_lse", "seed",
                        "dtype",     "rounding", "scaling", "saturate", "margin"};
  for (int i = 0; i < 10; ++i) {
    *names[i] = PyUnicode_InternFromString(text[i]);
    if (*names[i] == nullptr) return nullptr;
  }
  return PyModule_Create(&module_def);
}
