// Python bindings: argument checks and m.def only; the work lives in the other files.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "masking.h"
#include "packing.h"
#include "shards.h"

namespace py = pybind11;
using namespace instructpack;

namespace {

template <typename T>
using carray = py::array_t<T, py::array::c_style | py::array::forcecast>;

void require(bool ok, const std::string& message) {
  if (!ok) throw py::value_error(message);
}

// Checks that `begin` is a valid CSR boundary array over `total` items: starts at 0,
// never decreases, ends at `total`.
void check_boundaries(const carray<int64_t>& begin, int64_t total, const char* name) {
  require(begin.ndim() == 1 && begin.size() >= 1, std::string(name) + " must be 1-D with at least one entry");
  const int64_t* b = begin.data();
  require(b[0] == 0 && b[begin.size() - 1] == total, std::string(name) + " must start at 0 and end at the total count");
  for (py::ssize_t i = 1; i < begin.size(); ++i) require(b[i - 1] <= b[i], std::string(name) + " must not decrease");
}

py::tuple label_mask_py(const carray<int64_t>& starts, const carray<int64_t>& ends, const carray<int64_t>& tok_begin,
                        const carray<int64_t>& span_starts, const carray<int64_t>& span_ends,
                        const carray<int64_t>& span_begin) {
  require(starts.ndim() == 1 && ends.ndim() == 1 && starts.size() == ends.size(),
          "starts and ends must be 1-D and of equal length");
  require(span_starts.ndim() == 1 && span_ends.ndim() == 1 && span_starts.size() == span_ends.size(),
          "span_starts and span_ends must be 1-D and of equal length");
  check_boundaries(tok_begin, starts.size(), "tok_begin");
  check_boundaries(span_begin, span_starts.size(), "span_begin");
  require(tok_begin.size() == span_begin.size(), "tok_begin and span_begin must cover the same samples");
  const int64_t num_samples = tok_begin.size() - 1;
  const int64_t* sb = span_begin.data();
  const int64_t* ss = span_starts.data();
  const int64_t* se = span_ends.data();
  for (int64_t s = 0; s < num_samples; ++s)
    for (int64_t k = sb[s]; k < sb[s + 1]; ++k) {
      require(ss[k] < se[k], "spans must be non-empty (start < end)");
      require(k == sb[s] || se[k - 1] <= ss[k], "spans of a sample must be sorted and disjoint");
    }

  py::array_t<uint8_t> mask(starts.size());
  py::array_t<int64_t> trained(num_samples);
  {
    uint8_t* m = mask.mutable_data();
    int64_t* t = trained.mutable_data();
    py::gil_scoped_release release;
    label_mask(starts.data(), ends.data(), tok_begin.data(), ss, se, sb, num_samples, m, t);
  }
  return py::make_tuple(mask, trained);
}

py::tuple token_byte_offsets_py(const carray<uint32_t>& ids, const carray<int64_t>& tok_begin,
                                const carray<int32_t>& byte_len) {
  require(ids.ndim() == 1 && byte_len.ndim() == 1, "ids and byte_len must be 1-D");
  check_boundaries(tok_begin, ids.size(), "tok_begin");
  const int64_t num_samples = tok_begin.size() - 1;
  py::array_t<int64_t> starts(ids.size()), ends(ids.size()), total(num_samples);
  int64_t *a = starts.mutable_data(), *b = ends.mutable_data(), *c = total.mutable_data();
  {
    py::gil_scoped_release release;
    token_byte_offsets(ids.data(), tok_begin.data(), num_samples, byte_len.data(), byte_len.size(), a, b, c);
  }
  return py::make_tuple(starts, ends, total);
}

template <typename T>
void append_typed(ShardWriter& w, const py::array& tokens, const carray<uint8_t>& mask,
                  const carray<uint32_t>& lengths, const carray<uint32_t>& trained,
                  const carray<uint64_t>& source_lines) {
  carray<T> tok(tokens);
  const void* t = tok.data();
  py::gil_scoped_release release;
  w.append(t, mask.data(), static_cast<uint64_t>(tok.size()), lengths.data(), trained.data(), source_lines.data(),
           static_cast<uint64_t>(lengths.size()));
}

void append_py(ShardWriter& w, uint32_t token_bytes, const py::array& tokens, const carray<uint8_t>& mask,
               const carray<uint32_t>& lengths, const carray<uint32_t>& trained, const carray<uint64_t>& source_lines) {
  require(tokens.ndim() == 1 && mask.ndim() == 1 && tokens.size() == mask.size(),
          "tokens and mask must be 1-D and of equal length");
  require(lengths.ndim() == 1 && lengths.size() == trained.size() && lengths.size() == source_lines.size(),
          "lengths, trained and source_lines must be 1-D and of equal length");
  require(tokens.dtype().kind() == 'u' && static_cast<uint32_t>(tokens.itemsize()) == token_bytes,
          "tokens must be uint16 or uint32, matching the writer's token size");
  if (token_bytes == 2)
    append_typed<uint16_t>(w, tokens, mask, lengths, trained, source_lines);
  else
    append_typed<uint32_t>(w, tokens, mask, lengths, trained, source_lines);
}

// A read-only NumPy view into a shard's map; `owner` (the Python Shard) keeps it alive.
template <typename T>
py::array view(py::object owner, const void* data, uint64_t count) {
  py::array a(py::dtype::of<T>(), {static_cast<py::ssize_t>(count)}, {static_cast<py::ssize_t>(sizeof(T))}, data,
              owner);
  py::setattr(a.attr("flags"), "writeable", py::bool_(false));
  return a;
}

// One column of a shard's per-sample index.
template <typename T, const T* (Shard::*Column)() const>
py::array index_view(py::object self) {
  const Shard& s = self.cast<const Shard&>();
  return view<T>(self, (s.*Column)(), s.layout().num_samples);
}

py::array tokens_view(py::object self) {
  const Shard& s = self.cast<const Shard&>();
  const auto& l = s.layout();
  const uint8_t* p = s.base() + l.tokens_offset;
  return l.token_bytes == 2 ? view<uint16_t>(self, p, l.num_tokens) : view<uint32_t>(self, p, l.num_tokens);
}

py::tuple gather_py(const ShardSet& set, const carray<int64_t>& ids, bool shift_labels) {
  require(ids.ndim() == 1, "sample ids must be 1-D");
  const uint64_t n = static_cast<uint64_t>(ids.size());
  const uint64_t total = set.count_tokens(ids.data(), n);
  const auto t = static_cast<py::ssize_t>(total);
  py::array_t<int64_t> input_ids(t), labels(t), position_ids(t);
  py::array_t<int32_t> cu_seqlens(static_cast<py::ssize_t>(n + 1));
  int64_t *a = input_ids.mutable_data(), *b = labels.mutable_data(), *c = position_ids.mutable_data();
  int32_t* d = cu_seqlens.mutable_data();
  {
    py::gil_scoped_release release;
    set.gather(ids.data(), n, shift_labels, a, b, c, d);
  }
  return py::make_tuple(input_ids, labels, position_ids, cu_seqlens);
}

// Hands a vector's buffer to NumPy without copying; the capsule frees it with the array.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(owned->size())}, {static_cast<py::ssize_t>(sizeof(T))},
                        owned->data(), free_when_done);
}

py::tuple plan_epoch_py(const carray<int64_t>& lengths, int64_t effective_batch_size, int64_t max_batch_len,
                        int64_t world_size, uint64_t seed, uint64_t epoch, bool padded) {
  require(lengths.ndim() == 1, "lengths must be 1-D");
  const PlanOptions options{effective_batch_size, max_batch_len, world_size, seed, epoch, padded};
  EpochPlan plan;
  {
    py::gil_scoped_release release;
    plan = plan_epoch(lengths.data(), lengths.size(), options);
  }
  return py::make_tuple(to_numpy(std::move(plan.sample_ids)), to_numpy(std::move(plan.bin_begin)),
                        to_numpy(std::move(plan.step_bin_begin)), to_numpy(std::move(plan.lower_bound)));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "instructpack C++ kernels (see kernels.py for the typed wrappers)";
  // A DatasetError (a ValueError), so that callers catch shard faults with the library's other errors.
  py::object dataset_error = py::module_::import("instructpack.errors").attr("DatasetError");
  py::register_exception<ShardError>(m, "ShardError", dataset_error.ptr());

  m.def("label_mask", &label_mask_py, py::arg("starts"), py::arg("ends"), py::arg("tok_begin"), py::arg("span_starts"),
        py::arg("span_ends"), py::arg("span_begin"));
  m.def(
      "checksum64",
      [](py::buffer data) {
        py::buffer_info info = data.request();
        const auto* p = static_cast<const uint8_t*>(info.ptr);
        const auto size = static_cast<uint64_t>(info.size * info.itemsize);
        py::gil_scoped_release release;
        return checksum64(p, size);
      },
      py::arg("data"));
  m.def("token_byte_offsets", &token_byte_offsets_py, py::arg("ids"), py::arg("tok_begin"), py::arg("byte_len"));

  py::class_<ShardWriter>(m, "ShardWriter")
      .def(py::init<const std::string&, uint32_t>(), py::arg("path"), py::arg("token_bytes"))
      .def(
          "append",
          [](ShardWriter& w, const py::array& tokens, const carray<uint8_t>& mask, const carray<uint32_t>& lengths,
             const carray<uint32_t>& trained, const carray<uint64_t>& source_lines) {
            append_py(w, w.token_bytes(), tokens, mask, lengths, trained, source_lines);
          },
          py::arg("tokens"), py::arg("mask"), py::arg("lengths"), py::arg("trained"), py::arg("source_lines"))
      .def("close", &ShardWriter::close, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_samples", &ShardWriter::num_samples)
      .def_property_readonly("num_tokens", &ShardWriter::num_tokens)
      .def_property_readonly("token_bytes", &ShardWriter::token_bytes);

  py::class_<Shard>(m, "Shard")
      .def(py::init<const std::string&>(), py::arg("path"))
      .def_property_readonly("path", &Shard::path)
      .def_property_readonly("num_samples", [](const Shard& s) { return s.layout().num_samples; })
      .def_property_readonly("num_tokens", [](const Shard& s) { return s.layout().num_tokens; })
      .def_property_readonly("token_bytes", [](const Shard& s) { return s.layout().token_bytes; })
      .def_property_readonly("checksum", &Shard::stored_checksum)
      .def_property_readonly("tokens", &tokens_view)
      .def_property_readonly("mask",
                             [](py::object self) {
                               const Shard& s = self.cast<const Shard&>();
                               return view<uint8_t>(self, s.mask(), s.layout().num_tokens);
                             })
      .def_property_readonly("offsets", &index_view<uint64_t, &Shard::offsets>)
      .def_property_readonly("lengths", &index_view<uint32_t, &Shard::lengths>)
      .def_property_readonly("trained", &index_view<uint32_t, &Shard::trained>)
      .def_property_readonly("source_lines", &index_view<uint64_t, &Shard::source_lines>)
      .def("verify", &Shard::verify, py::call_guard<py::gil_scoped_release>());

  py::class_<ShardSet>(m, "ShardSet")
      .def(py::init<const std::vector<std::string>&>(), py::arg("paths"))
      .def_property_readonly("num_samples", &ShardSet::num_samples)
      .def_property_readonly("num_shards", [](const ShardSet& s) { return s.shards().size(); })
      .def(
          "shard",
          [](const ShardSet& s, size_t i) -> const Shard& {
            if (i >= s.shards().size()) throw py::index_error("shard index out of range");
            return s.shards()[i];
          },
          py::return_value_policy::reference_internal)
      .def("gather", &gather_py, py::arg("ids"), py::arg("shift_labels") = false);

  m.def("plan_epoch", &plan_epoch_py, py::arg("lengths"), py::arg("effective_batch_size"), py::arg("max_batch_len"),
        py::arg("world_size"), py::arg("seed"), py::arg("epoch"), py::arg("padded") = false);
  m.def(
      "epoch_permutation",
      [](int64_t n, uint64_t seed, uint64_t epoch) {
        require(n >= 0, "the number of samples must not be negative");
        return to_numpy(epoch_permutation(n, seed, epoch));
      },
      py::arg("num_samples"), py::arg("seed"), py::arg("epoch"));
}
