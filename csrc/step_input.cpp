// Native core of the paged KV cache's step input: turns block tables into flat slot indices
// and one padded table array, for every scheduled token of every step.
//
// Pure C++ with pybind11 (no torch headers) so it compiles in seconds. The block pool itself
// (free queue, reference counts, prefix cache) is Python (fastinfer/kv_cache/block_pool.py):
// its operations are O(1) and far below the scheduler's budget, and it is simpler there.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// For each scheduled sequence i, the tokens at positions [starts[i], ends[i]) are written to
// the cache: slot = block_table[pos / block_size] * block_size + pos % block_size.
// Returns one int64 slot per scheduled token, sequences packed back to back.
py::array_t<int64_t> slot_mapping(const std::vector<std::vector<int32_t>>& block_tables,
                                  const std::vector<int64_t>& starts,
                                  const std::vector<int64_t>& ends, int64_t block_size) {
  const size_t n = block_tables.size();
  if (starts.size() != n || ends.size() != n) {
    throw std::invalid_argument("slot_mapping: block_tables, starts and ends must have the same length");
  }
  if (block_size <= 0) throw std::invalid_argument("slot_mapping: block_size must be >= 1");
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    if (starts[i] < 0 || ends[i] < starts[i]) {
      throw std::invalid_argument("slot_mapping: bad range [" + std::to_string(starts[i]) + ", " +
                                  std::to_string(ends[i]) + ") for sequence " + std::to_string(i));
    }
    const int64_t need = (ends[i] + block_size - 1) / block_size;
    if (need > static_cast<int64_t>(block_tables[i].size())) {
      throw std::invalid_argument("slot_mapping: sequence " + std::to_string(i) + " needs " +
                                  std::to_string(need) + " blocks, has " +
                                  std::to_string(block_tables[i].size()));
    }
    total += ends[i] - starts[i];
  }
  py::array_t<int64_t> out(total);
  auto* p = out.mutable_data();
  for (size_t i = 0; i < n; ++i) {
    const auto& bt = block_tables[i];
    for (int64_t pos = starts[i]; pos < ends[i]; ++pos) {
      *p++ = static_cast<int64_t>(bt[pos / block_size]) * block_size + pos % block_size;
    }
  }
  return out;
}

// Block tables padded with `pad` into one [n, width] int32 array (width = longest table).
py::array_t<int32_t> pack_block_tables(const std::vector<std::vector<int32_t>>& block_tables,
                                       int32_t pad) {
  size_t width = 0;
  for (const auto& bt : block_tables) width = std::max(width, bt.size());
  py::array_t<int32_t> out({block_tables.size(), width});
  auto r = out.mutable_unchecked<2>();
  for (size_t i = 0; i < block_tables.size(); ++i) {
    const auto& bt = block_tables[i];
    for (size_t j = 0; j < width; ++j) r(i, j) = j < bt.size() ? bt[j] : pad;
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastinfer native core: step input preparation (slot mapping, block tables)";
  m.def("slot_mapping", &slot_mapping, py::arg("block_tables"), py::arg("starts"),
        py::arg("ends"), py::arg("block_size"));
  m.def("pack_block_tables", &pack_block_tables, py::arg("block_tables"), py::arg("pad") = -1);
}
