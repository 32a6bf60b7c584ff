// 0- and 1-dimensional persistence pairings of flag (clique) complexes of
// weighted graphs, batched over many graphs. Plain C++17: no Python, no torch.
//
// Filtration and tie rule (documented API, keep in sync with the Python docs):
//   * vertices enter at 0;
//   * edges are ordered by (weight, global edge index) ascending; an edge's
//     rank is its position in that order within its graph;
//   * triangle {a,b,c} exists iff its three edges do; its value is its longest
//     edge, and triangles are ordered by their edge ranks compared
//     lexicographically as (max, middle, min) ascending.
// Pairings are those of the standard Z/2 column reduction of the boundary
// matrix in that order. All edge indices in the result are GLOBAL indices into
// the concatenated edge array.
#pragma once

#include <cstdint>
#include <vector>

namespace reta {

// Non-owning view of a batch of graphs stored back to back.
struct GraphBatchView {
  const int64_t* edges = nullptr;  // [num_edges, 2] row-major, endpoints local to their graph
  const double* weights = nullptr;  // [num_edges]
  int64_t num_edges = 0;
  const int64_t* edge_offsets = nullptr;  // [num_edge_offsets], must be num_graphs + 1 long
  int64_t num_edge_offsets = 0;
  const int64_t* num_nodes = nullptr;  // [num_graphs]
  int64_t num_graphs = 0;
};

struct PersistenceResult {
  // H0: per graph, the edges merging two components, in edge order.
  std::vector<int64_t> h0_death_edges;
  std::vector<int64_t> h0_offsets;     // [B + 1]
  std::vector<int64_t> h0_components;  // [B], number of essential H0 classes

  // H1 (filled only for maxdim >= 1): (birth edge, death edge) pairs with
  // birth != death, flattened [M, 2], in order of the death triangle.
  std::vector<int64_t> h1_pairs;
  std::vector<int64_t> h1_offsets;  // [B + 1]
  // Positive edges never paired (essential H1 classes), in edge order.
  std::vector<int64_t> h1_essential;
  std::vector<int64_t> h1_essential_offsets;  // [B + 1]
};

// Throws std::invalid_argument (message names the offending argument) on
// malformed input: bad offsets, out-of-range endpoints, self-loops, duplicate
// edges within a graph, non-finite weights, negative num_nodes, maxdim not in
// {0, 1}. Graphs are processed in parallel when built with OpenMP; the result
// does not depend on the thread count.
PersistenceResult persistence_pairs(const GraphBatchView& batch, int maxdim);

// OpenMP thread count used by persistence_pairs (1 without OpenMP).
int max_threads();
// No-op without OpenMP.
void set_num_threads(int n);

}  // namespace reta
