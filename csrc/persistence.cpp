#include "persistence.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <iterator>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "union_find.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

// H1 algorithm. The pairing of a filtration is unique, so instead of reducing
// the boundary matrix (one column per triangle: ~n^3/6 columns for a complete
// graph, almost all of which reduce to zero) we reduce the coboundary matrix
// as Ripser does (de Silva, Morozov, Vejdemo-Johansson: same pairs):
//   * columns are edges in decreasing rank, each column is the set of
//     triangles containing the edge, its pivot is the smallest triangle;
//   * clearing: Kruskal merge edges (H0 deaths) reduce to zero and are skipped;
//   * apparent pairs: if an edge e is the longest edge of some triangle, the
//     smallest triangle with longest edge e is e's smallest coface, and no
//     column processed before e can contain it (all their triangles contain a
//     longer edge), so (e, that triangle) is a pair. These are exactly the
//     zero-persistence pairs (birth edge == death edge); they need neither a
//     reduction nor a stored column, only a per-edge record of the triangle.
// Only the remaining columns (nontrivial pairs and essential classes) are
// reduced, as sorted vectors of triangles with symmetric difference.
// The cross-check against a plain homology reduction lives in
// csrc/tests/test_persistence.cpp.

namespace reta {
namespace {

using Idx = int32_t;  // local vertex id, local edge id or edge rank within one graph
constexpr Idx kNone = std::numeric_limits<Idx>::max();

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

// A triangle as its edge ranks; member-wise lexicographic order is the
// triangle filtration order.
struct Tri {
  Idx hi, mid, lo;
  bool operator<(const Tri& o) const {
    if (hi != o.hi) return hi < o.hi;
    if (mid != o.mid) return mid < o.mid;
    return lo < o.lo;
  }
  bool operator==(const Tri& o) const { return hi == o.hi && mid == o.mid && lo == o.lo; }
};

Tri make_tri(Idx x, Idx y, Idx z) {
  if (x < y) std::swap(x, y);
  if (y < z) std::swap(y, z);
  if (x < y) std::swap(x, y);
  return {x, y, z};
}

constexpr uint64_t kNoTriangle = ~uint64_t{0};

uint64_t pack(Idx mid, Idx lo) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(mid)) << 32) | static_cast<uint32_t>(lo);
}

struct Pivot {
  Tri triangle;
  Idx birth;
  Idx next;  // next pivot with the same triangle.hi, or kNone
};

struct GraphResult {
  std::vector<int64_t> h0_deaths;
  int64_t components = 0;
  std::vector<int64_t> h1_pairs;  // flat (birth, death)
  std::vector<int64_t> h1_essential;
};

// Per-thread scratch reused across graphs and calls (fresh buffers cost ~1/3
// of H0 time on a 20k-node graph, mostly page faults).
struct Workspace {
  std::vector<Idx> row_start;                 // CSR offsets, [n + 1]
  std::vector<std::pair<Idx, Idx>> incident;  // (neighbour, local edge), rows unsorted
  std::vector<Idx> seen_row, seen_edge;       // duplicate detection
  std::vector<std::pair<uint64_t, Idx>> keyed, keyed_scratch;  // (weight key, local edge)
  std::vector<Idx> order;                     // rank -> local edge
  std::vector<Idx> rank;                      // local edge -> rank
  std::vector<unsigned char> merges;          // rank -> is a Kruskal merge edge
  UnionFind<Idx> uf;

  std::vector<Idx> fill;
  std::vector<std::pair<Idx, Idx>> adjacency;  // (neighbour, edge rank), rows sorted by neighbour
  std::vector<Idx> upper_start;                // first adjacency entry with neighbour > vertex
  std::vector<Idx> mark;                       // vertex -> edge rank, kNone when unmarked
  std::vector<uint64_t> own_min;  // rank -> pack(mid, lo) of its apparent triangle, or kNoTriangle
  std::vector<Tri> column, other, merged;
  // Non-apparent pairs: pivot triangle, birth rank, reduced column
  // pool[pool_start[k], pool_start[k + 1]), chained per pivot.hi for lookup.
  std::vector<Pivot> pivots;
  std::vector<Idx> pivot_head;  // rank -> first pivot with that hi, or kNone
  std::vector<Tri> pool;
  std::vector<std::size_t> pool_start;
  std::vector<std::pair<Tri, Idx>> found;  // (death triangle, birth rank)
  std::vector<Idx> essential;              // birth ranks
};

Workspace& thread_workspace() {
  thread_local Workspace ws;
  return ws;
}

// Workspaces take ~90 bytes per edge; a thread drops its own after a graph
// with more edges than this rather than keep over ~25 MB alive between calls.
constexpr int64_t kMaxRetainedEdges = int64_t{1} << 18;

// Maps a finite double to a uint64 with the same order; -0.0 and 0.0 both map
// to the key of 0.0 so that they tie (and fall back to the index order).
uint64_t order_preserving_bits(double w) {
  uint64_t bits;
  const double canonical = w == 0.0 ? 0.0 : w;
  std::memcpy(&bits, &canonical, sizeof bits);
  return (bits >> 63) ? ~bits : bits | (uint64_t{1} << 63);
}

// Edge sorting dominated H0 time with std::sort (~60% for 256-node kNN
// graphs). Stable LSD radix sort on the weight bits, 8 bits per pass, with
// passes skipped where all keys share the digit (e.g. the 29 always-zero
// mantissa bits of weights that were float32).
constexpr Idx kRadixMinEdges = 128;  // below this, std::sort is as fast

void radix_sort(std::vector<std::pair<uint64_t, Idx>>& items,
                std::vector<std::pair<uint64_t, Idx>>& scratch) {
  constexpr int kPasses = 8;
  Idx counts[kPasses][256] = {};
  for (const auto& item : items)
    for (int p = 0; p < kPasses; ++p) ++counts[p][(item.first >> (8 * p)) & 0xFF];
  scratch.resize(items.size());
  const Idx n = static_cast<Idx>(items.size());
  for (int p = 0; p < kPasses; ++p) {
    Idx* count = counts[p];
    if (count[(items[0].first >> (8 * p)) & 0xFF] == n) continue;
    Idx start = 0;
    for (int d = 0; d < 256; ++d) {
      const Idx c = count[d];
      count[d] = start;
      start += c;
    }
    for (const auto& item : items) scratch[count[(item.first >> (8 * p)) & 0xFF]++] = item;
    items.swap(scratch);
  }
}

void symmetric_difference_into(std::vector<Tri>& acc, const Tri* add_begin, const Tri* add_end,
                               std::vector<Tri>& scratch) {
  scratch.clear();
  std::set_symmetric_difference(acc.begin(), acc.end(), add_begin, add_end,
                                std::back_inserter(scratch));
  acc.swap(scratch);
}

class GraphSolver {
 public:
  GraphSolver(const GraphBatchView& batch, int64_t g, Workspace& ws)
      : g_(g),
        first_(batch.edge_offsets[g]),
        edges_(batch.edges + 2 * first_),
        weights_(batch.weights + first_),
        ws_(ws) {
    const int64_t n = batch.num_nodes[g];
    const int64_t m = batch.edge_offsets[g + 1] - first_;
    if (n > std::numeric_limits<Idx>::max())
      fail("num_nodes[" + std::to_string(g) + "] = " + std::to_string(n) +
           " exceeds the supported maximum of 2^31 - 1 nodes per graph");
    if (m > std::numeric_limits<Idx>::max())
      fail("edge_offsets: graph " + std::to_string(g) + " has " + std::to_string(m) +
           " edges, more than the supported 2^31 - 1 per graph");
    n_ = static_cast<Idx>(n);
    m_ = static_cast<Idx>(m);
  }

  void run(int maxdim, GraphResult& out) {
    validate_and_build_incidence();
    sort_edges();
    kruskal(maxdim, out);
    if (maxdim >= 1) h1(out);
  }

 private:
  Idx endpoint(Idx local_edge, int side) const {
    return static_cast<Idx>(edges_[2 * static_cast<int64_t>(local_edge) + side]);
  }

  std::string edge_name(Idx local_edge) const {
    return "edges[" + std::to_string(first_ + local_edge) + "] = (" +
           std::to_string(edges_[2 * static_cast<int64_t>(local_edge)]) + ", " +
           std::to_string(edges_[2 * static_cast<int64_t>(local_edge) + 1]) + ")";
  }

  void validate_and_build_incidence() {
    auto& row_start = ws_.row_start;
    row_start.assign(static_cast<std::size_t>(n_) + 1, 0);
    for (Idx e = 0; e < m_; ++e) {
      const int64_t u = edges_[2 * static_cast<int64_t>(e)];
      const int64_t v = edges_[2 * static_cast<int64_t>(e) + 1];
      if (u < 0 || u >= n_ || v < 0 || v >= n_)
        fail(edge_name(e) + " of graph " + std::to_string(g_) + " has an endpoint outside [0, " +
             std::to_string(n_) + ") (num_nodes[" + std::to_string(g_) + "] = " +
             std::to_string(n_) + ")");
      if (u == v) fail(edge_name(e) + " of graph " + std::to_string(g_) + " is a self-loop");
      if (!std::isfinite(weights_[e]))
        fail("weights[" + std::to_string(first_ + e) + "] = " + std::to_string(weights_[e]) +
             " (graph " + std::to_string(g_) + ") is not finite");
      // An edge entering before its vertices (at 0) would not be a filtration.
      if (weights_[e] < 0)
        fail("weights[" + std::to_string(first_ + e) + "] = " + std::to_string(weights_[e]) +
             " (graph " + std::to_string(g_) + ") is negative: edge lengths must be >= 0");
      ++row_start[u + 1];
      ++row_start[v + 1];
    }
    for (Idx v = 0; v < n_; ++v) row_start[v + 1] += row_start[v];

    auto& incident = ws_.incident;
    incident.resize(2 * static_cast<std::size_t>(m_));
    ws_.fill.assign(row_start.begin(), row_start.end() - 1);
    for (Idx e = 0; e < m_; ++e) {
      const Idx u = endpoint(e, 0), v = endpoint(e, 1);
      incident[ws_.fill[u]++] = {v, e};
      incident[ws_.fill[v]++] = {u, e};
    }

    // Linear-time duplicate check: within row u, a neighbour seen twice.
    ws_.seen_row.assign(n_, -1);
    ws_.seen_edge.resize(n_);
    for (Idx u = 0; u < n_; ++u) {
      for (Idx i = row_start[u]; i < row_start[u + 1]; ++i) {
        const auto [v, e] = incident[i];
        if (ws_.seen_row[v] == u) {
          const Idx a = std::min(ws_.seen_edge[v], e), b = std::max(ws_.seen_edge[v], e);
          fail("edges: duplicate edge in graph " + std::to_string(g_) + ": " + edge_name(a) +
               " and " + edge_name(b) + " join the same vertices");
        }
        ws_.seen_row[v] = u;
        ws_.seen_edge[v] = e;
      }
    }
  }

  void sort_edges() {
    auto& keyed = ws_.keyed;
    keyed.resize(m_);
    for (Idx e = 0; e < m_; ++e) keyed[e] = {order_preserving_bits(weights_[e]), e};
    // Ties keep increasing local index, i.e. increasing global index: the tie rule.
    if (m_ < kRadixMinEdges) {
      std::sort(keyed.begin(), keyed.end());
    } else {
      radix_sort(keyed, ws_.keyed_scratch);
    }
    ws_.order.resize(m_);
    ws_.rank.resize(m_);
    for (Idx r = 0; r < m_; ++r) {
      ws_.order[r] = keyed[r].second;
      ws_.rank[keyed[r].second] = r;
    }
  }

  void kruskal(int maxdim, GraphResult& out) {
    ws_.uf.reset(n_);
    ws_.merges.assign(m_, 0);
    out.h0_deaths.reserve(std::min(m_, std::max(n_ - 1, Idx{0})));
    Idx num_merges = 0;
    for (Idx r = 0; r < m_; ++r) {
      const Idx e = ws_.order[r];
      if (!ws_.uf.unite(endpoint(e, 0), endpoint(e, 1))) continue;
      ws_.merges[r] = 1;
      out.h0_deaths.push_back(first_ + e);
      // H1 needs every edge classified; H0 alone is done once connected.
      if (++num_merges == n_ - 1 && maxdim == 0) break;
    }
    out.components = static_cast<int64_t>(n_) - num_merges;
    num_merges_ = num_merges;
  }

  // Sorted-by-neighbour adjacency with ranks, by transposing the incidence
  // rows in vertex order (linear time, no per-row sort).
  void build_adjacency() {
    const auto& row_start = ws_.row_start;
    auto& adjacency = ws_.adjacency;
    adjacency.resize(2 * static_cast<std::size_t>(m_));
    ws_.fill.assign(row_start.begin(), row_start.end() - 1);
    ws_.upper_start.assign(row_start.begin(), row_start.end() - 1);
    for (Idx v = 0; v < n_; ++v)
      for (Idx i = row_start[v]; i < row_start[v + 1]; ++i) {
        const auto [u, e] = ws_.incident[i];
        adjacency[ws_.fill[u]++] = {v, ws_.rank[e]};
        ws_.upper_start[u] += v < u;
      }
  }

  // One pass over all triangles (each listed once, as a < b < c, by marking
  // the upper neighbours of a) recording for every edge the smallest triangle
  // in which it is the longest edge: its apparent pair. Branch-free inner loop
  // (a non-triangle lands in the spare slot m_); most edges need nothing else.
  void find_apparent_pairs() {
    const auto& row_start = ws_.row_start;
    const auto& upper_start = ws_.upper_start;
    const auto& adjacency = ws_.adjacency;
    auto& mark = ws_.mark;
    auto& own_min = ws_.own_min;
    own_min.assign(static_cast<std::size_t>(m_) + 1, kNoTriangle);
    for (Idx a = 0; a < n_; ++a) {
      for (Idx i = upper_start[a]; i < row_start[a + 1]; ++i)
        mark[adjacency[i].first] = adjacency[i].second;
      for (Idx i = upper_start[a]; i < row_start[a + 1]; ++i) {
        const auto [b, ab] = adjacency[i];
        for (Idx j = upper_start[b]; j < row_start[b + 1]; ++j) {
          const Idx ac = mark[adjacency[j].first], bc = adjacency[j].second;
          const Idx hi = std::max(ab, std::max(ac, bc));
          const Idx lo = std::min(ab, std::min(ac, bc));
          const std::size_t slot = ac == kNone ? static_cast<std::size_t>(m_) : hi;
          own_min[slot] = std::min(own_min[slot], pack(ab ^ ac ^ bc ^ hi ^ lo, lo));
        }
      }
      for (Idx i = upper_start[a]; i < row_start[a + 1]; ++i) mark[adjacency[i].first] = kNone;
    }
  }

  // Appends the triangles containing the edge of rank r to `out`, unsorted.
  void coboundary(Idx r, std::vector<Tri>& out) {
    const auto& row_start = ws_.row_start;
    const auto& adjacency = ws_.adjacency;
    auto& mark = ws_.mark;
    const Idx e = ws_.order[r];
    Idx a = endpoint(e, 0), b = endpoint(e, 1);
    if (row_start[a + 1] - row_start[a] > row_start[b + 1] - row_start[b]) std::swap(a, b);
    for (Idx i = row_start[a]; i < row_start[a + 1]; ++i)
      mark[adjacency[i].first] = adjacency[i].second;
    for (Idx i = row_start[b]; i < row_start[b + 1]; ++i) {
      const Idx ac = mark[adjacency[i].first];
      if (ac != kNone) out.push_back(make_tri(r, ac, adjacency[i].second));
    }
    for (Idx i = row_start[a]; i < row_start[a + 1]; ++i) mark[adjacency[i].first] = kNone;
  }

  bool is_apparent(const Tri& t) const { return ws_.own_min[t.hi] == pack(t.mid, t.lo); }

  Idx find_pivot(const Tri& t) const {
    Idx k = ws_.pivot_head[t.hi];
    while (k != kNone && !(ws_.pivots[k].triangle == t)) k = ws_.pivots[k].next;
    return k;
  }

  void h1(GraphResult& out) {
    ws_.pivots.clear();
    ws_.essential.clear();
    if (num_merges_ < m_) {
      build_adjacency();
      ws_.mark.assign(n_, kNone);
      find_apparent_pairs();
      reduce_coboundaries();
    }
    auto& found = ws_.found;
    found.clear();
    for (const auto& p : ws_.pivots) found.emplace_back(p.triangle, p.birth);
    std::sort(found.begin(), found.end(),
              [](const auto& x, const auto& y) { return x.first < y.first; });
    out.h1_pairs.reserve(2 * found.size());
    for (const auto& [death, birth] : found) {
      out.h1_pairs.push_back(first_ + ws_.order[birth]);
      out.h1_pairs.push_back(first_ + ws_.order[death.hi]);
    }
    std::sort(ws_.essential.begin(), ws_.essential.end());
    out.h1_essential.reserve(ws_.essential.size());
    for (Idx r : ws_.essential) out.h1_essential.push_back(first_ + ws_.order[r]);
  }

  void reduce_coboundaries() {
    auto& column = ws_.column;
    auto& other = ws_.other;
    auto& pool = ws_.pool;
    ws_.pivot_head.assign(m_, kNone);
    pool.clear();
    ws_.pool_start.assign(1, 0);
    for (Idx r = m_ - 1; r >= 0; --r) {
      // Clearing skips merge edges; apparent pairs have zero persistence.
      if (ws_.merges[r] || ws_.own_min[r] != kNoTriangle) continue;
      // Every triangle reachable from here contains an edge longer than r,
      // so a pair found below always has birth != death.
      column.clear();
      coboundary(r, column);
      std::sort(column.begin(), column.end());
      while (!column.empty()) {
        const Tri pivot = column.front();
        if (is_apparent(pivot)) {
          other.clear();
          coboundary(pivot.hi, other);
          std::sort(other.begin(), other.end());
          symmetric_difference_into(column, other.data(), other.data() + other.size(), ws_.merged);
          continue;
        }
        const Idx k = find_pivot(pivot);
        if (k == kNone) break;
        symmetric_difference_into(column, pool.data() + ws_.pool_start[k],
                                  pool.data() + ws_.pool_start[k + 1], ws_.merged);
      }
      if (column.empty()) {
        ws_.essential.push_back(r);
        continue;
      }
      const Tri pivot = column.front();
      ws_.pivots.push_back({pivot, r, ws_.pivot_head[pivot.hi]});
      ws_.pivot_head[pivot.hi] = static_cast<Idx>(ws_.pivots.size() - 1);
      pool.insert(pool.end(), column.begin(), column.end());
      ws_.pool_start.push_back(pool.size());
    }
  }

  const int64_t g_;
  const int64_t first_;  // global index of this graph's first edge
  const int64_t* const edges_;
  const double* const weights_;
  Workspace& ws_;
  Idx n_ = 0, m_ = 0, num_merges_ = 0;
};

void validate_batch(const GraphBatchView& batch, int maxdim) {
  if (maxdim != 0 && maxdim != 1) fail("maxdim must be 0 or 1, got " + std::to_string(maxdim));
  if (batch.num_edges < 0 || batch.num_graphs < 0) fail("edges/num_nodes: negative length");
  if (batch.num_edge_offsets != batch.num_graphs + 1)
    fail("edge_offsets must have length len(num_nodes) + 1 = " +
         std::to_string(batch.num_graphs + 1) + ", got " +
         std::to_string(batch.num_edge_offsets));
  const int64_t* off = batch.edge_offsets;
  if (off[0] != 0) fail("edge_offsets[0] must be 0, got " + std::to_string(off[0]));
  for (int64_t g = 0; g < batch.num_graphs; ++g)
    if (off[g + 1] < off[g])
      fail("edge_offsets must be non-decreasing, but edge_offsets[" + std::to_string(g + 1) +
           "] = " + std::to_string(off[g + 1]) + " < edge_offsets[" + std::to_string(g) +
           "] = " + std::to_string(off[g]));
  if (off[batch.num_graphs] != batch.num_edges)
    fail("edge_offsets[-1] must equal the number of edges " + std::to_string(batch.num_edges) +
         ", got " + std::to_string(off[batch.num_graphs]));
  for (int64_t g = 0; g < batch.num_graphs; ++g)
    if (batch.num_nodes[g] < 0)
      fail("num_nodes[" + std::to_string(g) + "] = " + std::to_string(batch.num_nodes[g]) +
           " is negative");
}

void flatten(std::vector<GraphResult>& results, std::vector<int64_t> GraphResult::*field,
             std::vector<int64_t>& flat, std::vector<int64_t>& offsets, int64_t stride) {
  offsets.assign(1, 0);
  std::size_t total = 0;
  for (auto& r : results) total += (r.*field).size();
  flat.reserve(total);
  for (auto& r : results) {
    flat.insert(flat.end(), (r.*field).begin(), (r.*field).end());
    offsets.push_back(static_cast<int64_t>(flat.size()) / stride);
  }
}

}  // namespace

PersistenceResult persistence_pairs(const GraphBatchView& batch, int maxdim) {
  validate_batch(batch, maxdim);
  const int64_t num_graphs = batch.num_graphs;
  std::vector<GraphResult> results(num_graphs);
  // Exceptions must not leave an OpenMP region: keep them per graph and
  // rethrow the one of the lowest graph index, so errors are deterministic too.
  std::vector<std::exception_ptr> errors(num_graphs);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t g = 0; g < num_graphs; ++g) {
    Workspace& ws = thread_workspace();
    try {
      GraphSolver(batch, g, ws).run(maxdim, results[g]);
    } catch (...) {
      errors[g] = std::current_exception();
    }
    if (batch.edge_offsets[g + 1] - batch.edge_offsets[g] > kMaxRetainedEdges) ws = Workspace();
  }
  for (const auto& error : errors)
    if (error) std::rethrow_exception(error);

  PersistenceResult out;
  flatten(results, &GraphResult::h0_deaths, out.h0_death_edges, out.h0_offsets, 1);
  out.h0_components.reserve(num_graphs);
  for (const auto& r : results) out.h0_components.push_back(r.components);
  if (maxdim >= 1) {
    flatten(results, &GraphResult::h1_pairs, out.h1_pairs, out.h1_offsets, 2);
    flatten(results, &GraphResult::h1_essential, out.h1_essential, out.h1_essential_offsets, 1);
  }
  return out;
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_num_threads(int n) {
#ifdef _OPENMP
  if (n > 0) omp_set_num_threads(n);
#else
  (void)n;
#endif
}

}  // namespace reta
