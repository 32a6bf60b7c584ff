// The one pybind11 binding file: module reta_fast._C. Only argument
// conversion and shape checks live here; the algorithms are in persistence.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "persistence.hpp"
#include "reta_build_info.hpp"

namespace py = pybind11;

namespace {

template <class T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Hands the vector's buffer to numpy without a copy.
py::array_t<int64_t> to_numpy(std::vector<int64_t>&& v, std::vector<py::ssize_t> shape) {
  auto* owned = new std::vector<int64_t>(std::move(v));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
  return py::array_t<int64_t>(std::move(shape), owned->data(), free_when_done);
}

py::array_t<int64_t> to_numpy(std::vector<int64_t>&& v) {
  const auto n = static_cast<py::ssize_t>(v.size());
  return to_numpy(std::move(v), {n});
}

py::dict persistence_pairs(const CArray<int64_t>& edges, const CArray<double>& weights,
                           const CArray<int64_t>& edge_offsets, const CArray<int64_t>& num_nodes,
                           int maxdim) {
  if (edges.ndim() != 2 || edges.shape(1) != 2)
    throw py::value_error("edges must have shape [E, 2], got " + shape_str(edges));
  const py::ssize_t num_edges = edges.shape(0);
  if (weights.ndim() != 1 || weights.shape(0) != num_edges)
    throw py::value_error("weights must have shape [E] = (" + std::to_string(num_edges) +
                          ",), got " + shape_str(weights));
  if (num_nodes.ndim() != 1)
    throw py::value_error("num_nodes must be 1-D [B], got " + shape_str(num_nodes));
  if (edge_offsets.ndim() != 1 || edge_offsets.shape(0) != num_nodes.shape(0) + 1)
    throw py::value_error("edge_offsets must have shape [B + 1] = (" +
                          std::to_string(num_nodes.shape(0) + 1) + ",), got " +
                          shape_str(edge_offsets));

  reta::GraphBatchView batch;
  batch.edges = edges.data();
  batch.weights = weights.data();
  batch.num_edges = num_edges;
  batch.edge_offsets = edge_offsets.data();
  batch.num_edge_offsets = edge_offsets.shape(0);
  batch.num_nodes = num_nodes.data();
  batch.num_graphs = num_nodes.shape(0);

  reta::PersistenceResult r;
  {
    py::gil_scoped_release release;
    r = reta::persistence_pairs(batch, maxdim);
  }

  py::dict out;
  out["h0_death_edges"] = to_numpy(std::move(r.h0_death_edges));
  out["h0_offsets"] = to_numpy(std::move(r.h0_offsets));
  out["h0_components"] = to_numpy(std::move(r.h0_components));
  if (maxdim >= 1) {
    const auto num_pairs = static_cast<py::ssize_t>(r.h1_pairs.size() / 2);
    out["h1_pairs"] = to_numpy(std::move(r.h1_pairs), {num_pairs, 2});
    out["h1_offsets"] = to_numpy(std::move(r.h1_offsets));
    out["h1_essential"] = to_numpy(std::move(r.h1_essential));
    out["h1_essential_offsets"] = to_numpy(std::move(r.h1_essential_offsets));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Native core of reta_fast: batched 0/1-dim persistence of graph flag complexes.";

  m.def("persistence_pairs", &persistence_pairs, py::arg("edges"), py::arg("weights"),
        py::arg("edge_offsets"), py::arg("num_nodes"), py::arg("maxdim"),
        R"doc(Persistence pairings (dims 0 and 1) of the flag complexes of a batch of graphs.

edges int64 [E, 2] (endpoints local to their graph), weights float64 [E],
edge_offsets int64 [B + 1], num_nodes int64 [B], maxdim 0 or 1.
Edges are ordered by (weight, global edge index); triangles by the ranks of
their edges as (max, middle, min). All returned edge indices are global.

Returns a dict of int64 arrays: h0_death_edges, h0_offsets [B + 1],
h0_components [B]; and for maxdim >= 1: h1_pairs [M, 2] (birth edge, death
edge; zero-persistence pairs dropped), h1_offsets [B + 1], h1_essential,
h1_essential_offsets [B + 1]. Raises ValueError on malformed input.)doc");

  m.attr("build_info") = RETA_BUILD_INFO;
}
