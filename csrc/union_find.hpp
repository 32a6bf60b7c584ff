// Disjoint sets (union-find) for Kruskal-style merging. Header-only, no deps.
//
// Variant choice: path halving + union by size. Measured with g++ 12 -O3 on
// presorted Kruskal edge streams (all unions, best of 200 runs):
//
//                         20k-node mutual 9-NN   100 x 256-node mutual 17-NN
//                         (46,000 edges)         (~1,626 edges each)
//   halving   + size        127 us                 733 us
//   halving   + rank        127 us                 727 us
//   splitting + size        338 us                 694 us
//   full (2-pass) + size    371 us                 751 us
//   halving, no balancing   611 us                 861 us
//   no compression + size   592 us                1194 us
//
// Halving is single-pass like splitting but 2.6x faster on the large graph
// (and within 6% on the small ones); size vs rank is a wash.
#pragma once

#include <cstddef>
#include <numeric>
#include <utility>
#include <vector>

namespace reta {

template <class Index = int>
class UnionFind {
 public:
  explicit UnionFind(Index n = 0) { reset(n); }

  // Reinitialises to n singletons, reusing the allocation.
  void reset(Index n) {
    parent_.resize(static_cast<std::size_t>(n));
    std::iota(parent_.begin(), parent_.end(), Index{0});
    size_.assign(static_cast<std::size_t>(n), Index{1});
  }

  Index find(Index x) {
    while (parent_[x] != x) {
      parent_[x] = parent_[parent_[x]];
      x = parent_[x];
    }
    return x;
  }

  // Returns true iff a and b were in different sets (i.e. a merge happened).
  bool unite(Index a, Index b) {
    a = find(a);
    b = find(b);
    if (a == b) return false;
    if (size_[a] < size_[b]) std::swap(a, b);
    parent_[b] = a;
    size_[a] += size_[b];
    return true;
  }

 private:
  std::vector<Index> parent_;
  std::vector<Index> size_;
};

}  // namespace reta
