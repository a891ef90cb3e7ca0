// Native core of the paged KV cache's step input: turns block tables into flat slot indices
// and one padded table array, for every scheduled token of every step.
//
// Pure C++ with pybind11 (no torch headers) so it compiles in seconds. The block pool itself
// (free queue, reference counts, prefix cache) is Python (fastinfer/kv_cache/block_pool.py):
// its operations are O(1) and far below the scheduler's budget, and it is simpler there.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
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

// Block tables padded with `pad` into one [n, width] array of T (width = longest table).
template <typename T>
py::array_t<T> pack_block_tables(const std::vector<std::vector<int32_t>>& block_tables, T pad) {
  size_t width = 0;
  for (const auto& bt : block_tables) width = std::max(width, bt.size());
  py::array_t<T> out({block_tables.size(), width});
  auto r = out.template mutable_unchecked<2>();
  for (size_t i = 0; i < block_tables.size(); ++i) {
    const auto& bt = block_tables[i];
    for (size_t j = 0; j < width; ++j) r(i, j) = j < bt.size() ? bt[j] : pad;
  }
  return out;
}

// A whole step's host arrays in one call (ModelRunner.pack): for sequence i, tokens token_ids[i]
// at positions start_positions[i] onward. Returns (ids [T], positions [T], slots [T], tables
// [B, W] int64 padded with 0, query_start_loc [B + 1] and context_lens [B] as int64 arrays and
// as lists, max_query_len, last_index): last_index holds, for each sequence whose needs_logits is
// true (all when empty), the row of its last token, or of its last num_spec[i] + 1 tokens.
py::tuple pack_step(const std::vector<std::vector<int64_t>>& token_ids, const std::vector<int64_t>& starts,
                    const std::vector<std::vector<int32_t>>& block_tables, const std::vector<bool>& needs_logits,
                    const std::vector<int64_t>& num_spec, int64_t block_size, int64_t num_slots) {
  const size_t n = token_ids.size();
  if (starts.size() != n || block_tables.size() != n || (!needs_logits.empty() && needs_logits.size() != n) ||
      (!num_spec.empty() && num_spec.size() != n))
    throw std::invalid_argument("pack_step: token_ids, start_positions, block_tables (and needs_logits, num_spec) "
                                "must have one entry per sequence");
  std::vector<int64_t> ends(n);
  py::array_t<int64_t> qsl(static_cast<py::ssize_t>(n + 1)), ctx(static_cast<py::ssize_t>(n));
  auto* q = qsl.mutable_data();
  auto* c = ctx.mutable_data();
  q[0] = 0;
  int64_t max_len = 0, wanted_rows = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t len = static_cast<int64_t>(token_ids[i].size());
    ends[i] = starts[i] + len;
    q[i + 1] = q[i] + len;
    c[i] = ends[i];
    max_len = std::max(max_len, len);
    if (needs_logits.empty() || needs_logits[i]) {
      const int64_t k = num_spec.empty() ? 0 : num_spec[i];
      if (k < 0 || k >= len)
        throw std::invalid_argument("pack_step: sequence " + std::to_string(i) + " wants logits at its last " +
                                    std::to_string(k + 1) + " tokens (num_spec " + std::to_string(k) +
                                    ") but has " + std::to_string(len));
      wanted_rows += k + 1;
    }
  }
  py::array_t<int64_t> slots = slot_mapping(block_tables, starts, ends, block_size);
  const int64_t T = q[n];
  const int64_t* sp = slots.data();
  for (int64_t t = 0; t < T; ++t)
    if (sp[t] < 0 || sp[t] >= num_slots)
      throw std::invalid_argument("a block table points outside the KV cache (" + std::to_string(num_slots) +
                                  " slots)");
  py::array_t<int64_t> ids(T), pos(T), last(wanted_rows);
  auto* ip = ids.mutable_data();
  auto* pp = pos.mutable_data();
  auto* lp = last.mutable_data();
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j < token_ids[i].size(); ++j) {
      *ip++ = token_ids[i][j];
      *pp++ = starts[i] + static_cast<int64_t>(j);
    }
    if (needs_logits.empty() || needs_logits[i]) {
      const int64_t k = num_spec.empty() ? 0 : num_spec[i];
      for (int64_t r = q[i + 1] - 1 - k; r < q[i + 1]; ++r) *lp++ = r;
    }
  }
  py::list qsl_list(n + 1), ctx_list(n);
  for (size_t i = 0; i <= n; ++i) qsl_list[i] = q[i];
  for (size_t i = 0; i < n; ++i) ctx_list[i] = c[i];
  return py::make_tuple(ids, pos, slots, pack_block_tables<int64_t>(block_tables, 0), qsl, ctx, qsl_list, ctx_list,
                        max_len, last);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastinfer native core: step input preparation (slot mapping, block tables)";
  m.def("slot_mapping", &slot_mapping, py::arg("block_tables"), py::arg("starts"),
        py::arg("ends"), py::arg("block_size"));
  m.def("pack_block_tables", &pack_block_tables<int32_t>, py::arg("block_tables"), py::arg("pad") = -1);
  m.def("pack_step", &pack_step, py::arg("token_ids"), py::arg("start_positions"), py::arg("block_tables"),
        py::arg("needs_logits"), py::arg("num_spec"), py::arg("block_size"), py::arg("num_slots"));
}
