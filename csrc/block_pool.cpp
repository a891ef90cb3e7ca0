// Native core of the paged KV cache: the block pool (free list + reference counts) and the
// per-step input preparation that turns block tables into flat slot indices.
//
// Pure C++ with pybind11 (no torch headers) so it compiles in seconds. The Python side
// (fastinfer/kv_cache/block_manager.py) owns policy; this file owns the bookkeeping that
// runs for every scheduled token of every step.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <deque>
#include <unordered_map>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// A fixed pool of KV-cache block ids [0, num_blocks). Blocks are handed out from a FIFO
// free queue (a freed block goes to the back, so recently freed blocks are reused last,
// which a prefix cache will rely on) and carry a reference count so that later issues can
// share blocks between sequences (prefix caching, copy-on-write, parallel sampling).
class BlockPool {
 public:
  explicit BlockPool(int64_t num_blocks) : ref_(checked_count(num_blocks), 0) {
    for (int64_t i = 0; i < num_blocks; ++i) free_.push_back(static_cast<int32_t>(i));
  }

  int64_t num_total() const { return static_cast<int64_t>(ref_.size()); }
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }
  bool can_allocate(int64_t n) const {
    if (n < 0) throw std::invalid_argument("can_allocate: n must be >= 0, got " + std::to_string(n));
    return n <= num_free();
  }

  std::vector<int32_t> allocate(int64_t n) {
    if (n < 0) throw std::invalid_argument("allocate: n must be >= 0, got " + std::to_string(n));
    if (n > num_free()) {
      throw std::runtime_error("allocate: asked for " + std::to_string(n) + " blocks, " +
                               std::to_string(num_free()) + " free");
    }
    std::vector<int32_t> out;
    out.reserve(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      int32_t b = free_.front();
      free_.pop_front();
      ref_[b] = 1;
      out.push_back(b);
    }
    return out;
  }

  void incref(const std::vector<int32_t>& blocks) {
    for (int32_t b : blocks) check_live(b, "incref");  // all or nothing
    for (int32_t b : blocks) ++ref_[b];
  }

  // Drops one reference per occurrence of each block; blocks that reach zero return to the
  // free queue. All or nothing: a list that names a block more often than it is referenced
  // (free([b, b]) with one reference) is refused before any count changes.
  void free(const std::vector<int32_t>& blocks) {
    std::unordered_map<int32_t, int32_t> drops;
    for (int32_t b : blocks) {
      check_live(b, "free");
      if (++drops[b] > ref_[b]) {
        throw std::runtime_error("free: block " + std::to_string(b) + " is named " +
                                 std::to_string(drops[b]) + " times but holds " +
                                 std::to_string(ref_[b]) + " reference(s)");
      }
    }
    for (int32_t b : blocks) {
      if (--ref_[b] == 0) free_.push_back(b);
    }
  }

  int32_t refcount(int32_t b) const {
    check_range(b, "refcount");
    return ref_[b];
  }

 private:
  static size_t checked_count(int64_t num_blocks) {
    if (num_blocks <= 0 || num_blocks > INT32_MAX) {
      throw std::invalid_argument("num_blocks must be in [1, 2^31), got " + std::to_string(num_blocks));
    }
    return static_cast<size_t>(num_blocks);
  }
  void check_range(int32_t b, const char* what) const {
    if (b < 0 || b >= static_cast<int32_t>(ref_.size())) {
      throw std::out_of_range(std::string(what) + ": block id " + std::to_string(b) +
                              " outside [0, " + std::to_string(ref_.size()) + ")");
    }
  }
  void check_live(int32_t b, const char* what) const {
    check_range(b, what);
    if (ref_[b] <= 0) {
      throw std::runtime_error(std::string(what) + ": block " + std::to_string(b) + " is not allocated");
    }
  }

  std::deque<int32_t> free_;
  std::vector<int32_t> ref_;
};

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
  m.doc() = "fastinfer native core: KV block pool and step input preparation";
  py::class_<BlockPool>(m, "BlockPool")
      .def(py::init<int64_t>(), py::arg("num_blocks"))
      .def_property_readonly("num_total", &BlockPool::num_total)
      .def_property_readonly("num_free", &BlockPool::num_free)
      .def("can_allocate", &BlockPool::can_allocate, py::arg("n"))
      .def("allocate", &BlockPool::allocate, py::arg("n"))
      .def("incref", &BlockPool::incref, py::arg("blocks"))
      .def("free", &BlockPool::free, py::arg("blocks"))
      .def("refcount", &BlockPool::refcount, py::arg("block"));
  m.def("slot_mapping", &slot_mapping, py::arg("block_tables"), py::arg("starts"),
        py::arg("ends"), py::arg("block_size"));
  m.def("pack_block_tables", &pack_block_tables, py::arg("block_tables"), py::arg("pad") = -1);
}
