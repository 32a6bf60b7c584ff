// Unit tests for reta::persistence_pairs: hand-computed graphs, validation
// errors, and a randomized cross-check against a deliberately naive homology
// reduction (all triangles, full boundary columns) that shares no code with
// the cohomology implementation.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <iterator>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "persistence.hpp"

namespace {

int failures = 0;

#define CHECK(cond, msg)                                                                 \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: %s\n", __FILE__, __LINE__, #cond, \
                   std::string(msg).c_str());                                            \
      ++failures;                                                                        \
    }                                                                                    \
  } while (0)

using I64s = std::vector<int64_t>;

std::string str(const I64s& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

struct Graph {
  int64_t n = 0;
  std::vector<std::array<int64_t, 2>> edges;
  std::vector<double> weights;
};

struct Batch {
  I64s edges, offsets{0}, num_nodes;
  std::vector<double> weights;

  explicit Batch(const std::vector<Graph>& graphs) {
    for (const auto& g : graphs) {
      for (std::size_t i = 0; i < g.edges.size(); ++i) {
        edges.push_back(g.edges[i][0]);
        edges.push_back(g.edges[i][1]);
        weights.push_back(g.weights[i]);
      }
      offsets.push_back(static_cast<int64_t>(weights.size()));
      num_nodes.push_back(g.n);
    }
  }

  reta::GraphBatchView view() const {
    reta::GraphBatchView v;
    v.edges = edges.data();
    v.weights = weights.data();
    v.num_edges = static_cast<int64_t>(weights.size());
    v.edge_offsets = offsets.data();
    v.num_edge_offsets = static_cast<int64_t>(offsets.size());
    v.num_nodes = num_nodes.data();
    v.num_graphs = static_cast<int64_t>(num_nodes.size());
    return v;
  }
};

reta::PersistenceResult run(const std::vector<Graph>& graphs, int maxdim = 1) {
  return reta::persistence_pairs(Batch(graphs).view(), maxdim);
}

// Textbook reduction of the full boundary matrix, O(n^3) triangles.
reta::PersistenceResult reference(const std::vector<Graph>& graphs) {
  reta::PersistenceResult out;
  out.h0_offsets = out.h1_offsets = out.h1_essential_offsets = {0};
  int64_t first = 0;
  for (const auto& g : graphs) {
    const int m = static_cast<int>(g.edges.size());
    std::vector<int> order(m), rank(m);
    for (int i = 0; i < m; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return g.weights[a] < g.weights[b]; });
    for (int r = 0; r < m; ++r) rank[order[r]] = r;

    std::vector<int64_t> parent(g.n);
    for (int64_t v = 0; v < g.n; ++v) parent[v] = v;
    auto find = [&](int64_t v) {
      while (parent[v] != v) v = parent[v];
      return v;
    };
    std::vector<bool> merge(m, false);
    int64_t components = g.n;
    for (int r = 0; r < m; ++r) {
      const auto a = find(g.edges[order[r]][0]), b = find(g.edges[order[r]][1]);
      if (a == b) continue;
      parent[a] = b;
      merge[r] = true;
      --components;
      out.h0_death_edges.push_back(first + order[r]);
    }
    out.h0_offsets.push_back(static_cast<int64_t>(out.h0_death_edges.size()));
    out.h0_components.push_back(components);

    std::vector<std::vector<int>> edge_rank(g.n, std::vector<int>(g.n, -1));
    for (int e = 0; e < m; ++e)
      edge_rank[g.edges[e][0]][g.edges[e][1]] = edge_rank[g.edges[e][1]][g.edges[e][0]] = rank[e];
    std::vector<std::array<int, 3>> triangles;  // (max, mid, min) ranks
    for (int64_t a = 0; a < g.n; ++a)
      for (int64_t b = a + 1; b < g.n; ++b)
        for (int64_t c = b + 1; c < g.n; ++c) {
          std::array<int, 3> t{edge_rank[a][b], edge_rank[a][c], edge_rank[b][c]};
          if (*std::min_element(t.begin(), t.end()) < 0) continue;
          std::sort(t.rbegin(), t.rend());
          triangles.push_back(t);
        }
    std::sort(triangles.begin(), triangles.end());

    std::vector<std::vector<int>> reduced_by_pivot(m);  // ascending ranks
    for (const auto& t : triangles) {
      std::vector<int> column{t[2], t[1], t[0]};
      while (!column.empty() && !reduced_by_pivot[column.back()].empty()) {
        std::vector<int> sum;
        const auto& other = reduced_by_pivot[column.back()];
        std::set_symmetric_difference(column.begin(), column.end(), other.begin(), other.end(),
                                      std::back_inserter(sum));
        column.swap(sum);
      }
      if (column.empty()) continue;
      const int pivot = column.back();
      reduced_by_pivot[pivot] = column;
      if (pivot != t[0]) {
        out.h1_pairs.push_back(first + order[pivot]);
        out.h1_pairs.push_back(first + order[t[0]]);
      }
    }
    for (int r = 0; r < m; ++r)
      if (!merge[r] && reduced_by_pivot[r].empty()) out.h1_essential.push_back(first + order[r]);
    out.h1_offsets.push_back(static_cast<int64_t>(out.h1_pairs.size() / 2));
    out.h1_essential_offsets.push_back(static_cast<int64_t>(out.h1_essential.size()));
    first += m;
  }
  return out;
}

void check_equal(const reta::PersistenceResult& got, const reta::PersistenceResult& want,
                 const std::string& what) {
  const auto field = [&](const std::vector<int64_t>& a, const std::vector<int64_t>& b, const char* name) {
    CHECK(a == b, what + ": " + name + " " + str(a) + " != " + str(b));
  };
  field(got.h0_death_edges, want.h0_death_edges, "h0_death_edges");
  field(got.h0_offsets, want.h0_offsets, "h0_offsets");
  field(got.h0_components, want.h0_components, "h0_components");
  field(got.h1_pairs, want.h1_pairs, "h1_pairs");
  field(got.h1_offsets, want.h1_offsets, "h1_offsets");
  field(got.h1_essential, want.h1_essential, "h1_essential");
  field(got.h1_essential_offsets, want.h1_essential_offsets, "h1_essential_offsets");
}

void test_square_with_diagonal() {
  // 0-1-2-3-0 with diagonal 0-2 added last: the cycle born at 3-0 (w=4) dies
  // when the diagonal (w=5) fills both triangles; {0,1,2} is a trivial pair.
  const Graph g{4, {{0, 1}, {1, 2}, {2, 3}, {3, 0}, {0, 2}}, {1, 2, 3, 4, 5}};
  const auto r = run({g});
  CHECK(r.h0_death_edges == (I64s{0, 1, 2}), str(r.h0_death_edges));
  CHECK(r.h0_components == (I64s{1}), str(r.h0_components));
  CHECK(r.h1_pairs == (I64s{3, 4}), str(r.h1_pairs));
  CHECK(r.h1_offsets == (I64s{0, 1}), str(r.h1_offsets));
  CHECK(r.h1_essential.empty(), str(r.h1_essential));
  CHECK(r.h1_essential_offsets == (I64s{0, 0}), str(r.h1_essential_offsets));
}

void test_four_cycle_never_dies() {
  const Graph g{4, {{0, 1}, {1, 2}, {2, 3}, {3, 0}}, {0.5, 0.25, 1.0, 2.0}};
  const auto r = run({g});
  CHECK(r.h0_death_edges == (I64s{1, 0, 2}), str(r.h0_death_edges));
  CHECK(r.h1_pairs.empty(), str(r.h1_pairs));
  CHECK(r.h1_essential == (I64s{3}), str(r.h1_essential));
}

void test_triangle() {
  const Graph g{3, {{0, 1}, {1, 2}, {0, 2}}, {1, 1, 1}};
  const auto r = run({g});
  CHECK(r.h0_death_edges == (I64s{0, 1}), str(r.h0_death_edges));
  CHECK(r.h0_components == (I64s{1}), str(r.h0_components));
  CHECK(r.h1_pairs.empty() && r.h1_essential.empty(), str(r.h1_pairs) + str(r.h1_essential));
}

void test_ties_follow_edge_index() {
  // All weights equal, so the order is the index order: the diagonal (index 0)
  // comes first, both triangles are filled by their own longest edge and no
  // H1 class survives, unlike the square-with-diagonal test.
  const Graph g{4, {{0, 2}, {0, 1}, {1, 2}, {2, 3}, {3, 0}}, {7, 7, 7, 7, 7}};
  const auto r = run({g});
  CHECK(r.h0_death_edges == (I64s{0, 1, 3}), str(r.h0_death_edges));
  CHECK(r.h1_pairs.empty() && r.h1_essential.empty(), str(r.h1_pairs) + str(r.h1_essential));

  // Same square as test_square_with_diagonal, with the diagonal tied to the
  // closing edge but listed after it: the pair survives with equal weights.
  const Graph h{4, {{0, 1}, {1, 2}, {2, 3}, {3, 0}, {0, 2}}, {1, 2, 3, 4, 4}};
  const auto s = run({h});
  CHECK(s.h1_pairs == (I64s{3, 4}), str(s.h1_pairs));
}

void test_duplicate_weights_across_batch() {
  // Global indices, per-graph offsets, and ties broken by global index.
  const Graph a{3, {{0, 1}, {1, 2}, {0, 2}}, {2, 2, 2}};
  const Graph b{4, {{0, 1}, {1, 2}, {2, 3}, {3, 0}}, {1, 1, 1, 1}};
  const auto r = run({a, b});
  CHECK(r.h0_death_edges == (I64s{0, 1, 3, 4, 5}), str(r.h0_death_edges));
  CHECK(r.h0_offsets == (I64s{0, 2, 5}), str(r.h0_offsets));
  CHECK(r.h1_essential == (I64s{6}), str(r.h1_essential));
  CHECK(r.h1_essential_offsets == (I64s{0, 0, 1}), str(r.h1_essential_offsets));
  CHECK(r.h1_offsets == (I64s{0, 0, 0}), str(r.h1_offsets));
}

void test_disconnected_and_empty() {
  // Two edges, a triangle, an isolated vertex; then an empty graph and a
  // graph with no vertices.
  const Graph a{6, {{4, 3}, {0, 1}, {1, 2}, {2, 0}}, {3, 1, 1, 2}};
  const Graph empty_edges{5, {}, {}};
  const Graph no_nodes{0, {}, {}};
  const auto r = run({a, empty_edges, no_nodes});
  CHECK(r.h0_components == (I64s{3, 5, 0}), str(r.h0_components));
  CHECK(r.h0_death_edges == (I64s{1, 2, 0}), str(r.h0_death_edges));
  CHECK(r.h0_offsets == (I64s{0, 3, 3, 3}), str(r.h0_offsets));
  CHECK(r.h1_offsets == (I64s{0, 0, 0, 0}), str(r.h1_offsets));

  const auto r0 = run({a, empty_edges, no_nodes}, 0);
  CHECK(r0.h0_death_edges == r.h0_death_edges, str(r0.h0_death_edges));
  CHECK(r0.h1_offsets.empty() && r0.h1_essential_offsets.empty(), "maxdim=0 must leave H1 empty");

  const auto none = run({});
  CHECK(none.h0_offsets == (I64s{0}) && none.h1_offsets == (I64s{0}), str(none.h0_offsets));
}

void expect_invalid(const Batch& batch, int maxdim, const std::string& needle) {
  try {
    reta::persistence_pairs(batch.view(), maxdim);
    CHECK(false, "expected std::invalid_argument mentioning '" + needle + "'");
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()).find(needle) != std::string::npos,
          "message '" + std::string(e.what()) + "' lacks '" + needle + "'");
  }
}

void test_validation() {
  const Graph ok{3, {{0, 1}, {1, 2}}, {1, 2}};
  expect_invalid(Batch({ok}), 2, "maxdim");
  expect_invalid(Batch({ok, Graph{3, {{0, 3}}, {1}}}), 1, "edges[2] = (0, 3) of graph 1");
  expect_invalid(Batch({Graph{3, {{-1, 0}}, {1}}}), 1, "edges[0] = (-1, 0)");
  expect_invalid(Batch({Graph{3, {{1, 1}}, {1}}}), 1, "self-loop");
  expect_invalid(Batch({Graph{3, {{0, 1}, {2, 0}, {1, 0}}, {1, 2, 3}}}), 0,
                 "edges[0] = (0, 1) and edges[2] = (1, 0)");
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  expect_invalid(Batch({Graph{3, {{0, 1}, {1, 2}}, {1, inf}}}), 1, "weights[1]");
  expect_invalid(Batch({Graph{3, {{0, 1}}, {nan}}}), 0, "not finite");
  expect_invalid(Batch({Graph{3, {{0, 1}, {1, 2}}, {1, -0.5}}}), 1, "is negative: edge lengths must be >= 0");
  expect_invalid(Batch({ok, Graph{-1, {}, {}}}), 1, "num_nodes[1] = -1 is negative");

  Batch bad_offsets({ok, ok});
  bad_offsets.offsets = {0, 3, 2, 4};
  bad_offsets.num_nodes.push_back(1);
  expect_invalid(bad_offsets, 1, "non-decreasing");
  bad_offsets.offsets = {0, 1, 2, 3};
  expect_invalid(bad_offsets, 1, "edge_offsets[-1]");
  bad_offsets.offsets = {1, 2, 3, 4};
  expect_invalid(bad_offsets, 1, "edge_offsets[0]");
  bad_offsets.offsets = {0, 4};
  expect_invalid(bad_offsets, 1, "edge_offsets must have length");
}

Graph random_graph(std::mt19937_64& rng, int max_n, bool integer_weights) {
  Graph g;
  g.n = std::uniform_int_distribution<int>(0, max_n)(rng);
  const double p = std::uniform_real_distribution<double>(0.1, 1.0)(rng);
  std::bernoulli_distribution keep(p);
  std::uniform_int_distribution<int> small(0, 3);
  std::uniform_real_distribution<double> real(0.0, 2.0);
  for (int64_t a = 0; a < g.n; ++a)
    for (int64_t b = a + 1; b < g.n; ++b)
      if (keep(rng)) {
        g.edges.push_back(rng() & 1 ? std::array<int64_t, 2>{a, b} : std::array<int64_t, 2>{b, a});
        g.weights.push_back(integer_weights ? small(rng) : real(rng));
      }
  // Random edge order so that index tie-breaking is exercised.
  std::vector<std::size_t> perm(g.edges.size());
  for (std::size_t i = 0; i < perm.size(); ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  Graph shuffled{g.n, {}, {}};
  for (auto i : perm) {
    shuffled.edges.push_back(g.edges[i]);
    shuffled.weights.push_back(g.weights[i]);
  }
  return shuffled;
}

void test_against_reference() {
  std::mt19937_64 rng(12345);
  for (int round = 0; round < 60; ++round) {
    std::vector<Graph> graphs;
    for (int i = 0; i < 20; ++i) graphs.push_back(random_graph(rng, 14, round % 2 == 0));
    const auto want = reference(graphs);
    check_equal(run(graphs), want, "random round " + std::to_string(round));
    auto h0_only = run(graphs, 0);
    CHECK(h0_only.h0_death_edges == want.h0_death_edges &&
              h0_only.h0_components == want.h0_components,
          "maxdim=0 H0 differs from maxdim=1 H0, round " + std::to_string(round));
  }
}

void test_thread_count_does_not_change_result() {
  std::mt19937_64 rng(7);
  std::vector<Graph> graphs;
  for (int i = 0; i < 64; ++i) graphs.push_back(random_graph(rng, 24, i % 2 == 0));
  const int saved = reta::max_threads();
  reta::set_num_threads(1);
  const auto serial = run(graphs);
  reta::set_num_threads(4);
  check_equal(run(graphs), serial, "4 threads vs 1");
  reta::set_num_threads(saved);
}

}  // namespace

int main() {
  test_square_with_diagonal();
  test_four_cycle_never_dies();
  test_triangle();
  test_ties_follow_edge_index();
  test_duplicate_weights_across_batch();
  test_disconnected_and_empty();
  test_validation();
  test_against_reference();
  test_thread_count_does_not_change_result();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all persistence tests passed (threads: %d)\n", reta::max_threads());
  return 0;
}
