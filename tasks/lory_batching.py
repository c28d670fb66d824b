"""Similarity-based data batching for Lory (seed_methods.md §3.4; In-Context Pretraining, Shi et al. 2024).

Lory routes segment k on segment k−1, so it learns most when neighbouring segments are about the same
thing. Documents are therefore concatenated in an order where similar documents are adjacent:

  1. embed every document (TF-IDF here by default: numpy/scipy only; the paper uses Contriever, and any
     `embed(texts) -> [N, D]` function can be passed),
  2. exact k-nearest neighbours by cosine similarity (k = 10, our choice; the paper does not say),
  3. an undirected graph with an edge when either document is in the other's top-k, weighted by cosine,
  4. a greedy approximate maximum-TSP path (ICLM's Algorithm 1): start at an unvisited document of minimum
     degree, keep moving to the most similar unvisited neighbour, and when there is none jump to the next
     unvisited document of minimum degree. Every document is used exactly once. Ties go to the lowest index
     (our choice).
  5. concatenate token ids in that order with EOS separators and cut the stream into fixed-length
     instances (`pack_in_order`). How the instances are then shuffled into batches is left to the pipeline.

Exact search is O(N²·D) in chunks: fine up to ~10⁵ documents; beyond that use an approximate index.
"""

import collections
import heapq
import math
import re
from typing import Callable, Optional, Sequence

import numpy as np
import scipy.sparse as sp

_WORD = re.compile(r'\w+', re.UNICODE)


def tokenize(text: str) -> list[str]:
  """Lower-cased word tokens (\\w+)."""
  return _WORD.findall(text.lower())


def tfidf_embeddings(texts: Sequence[str], *, sublinear_tf: bool = True) -> sp.csr_matrix:
  """TF-IDF vectors, one L2-normalised row per document.

  tf = 1 + log(count) (sublinear) or count; idf = log((1 + N) / (1 + df)) + 1 (smoothed, as sklearn's
  default), so a term in every document still counts a little.

  Returns:
    <float32> CSR matrix [N, V]; an empty document gives a zero row.
  """
  vocab: dict[str, int] = {}
  rows, cols, vals = [], [], []
  for i, text in enumerate(texts):
    counts = collections.Counter(tokenize(text))
    for term, c in counts.items():
      rows.append(i)
      cols.append(vocab.setdefault(term, len(vocab)))
      vals.append(1.0 + math.log(c) if sublinear_tf else float(c))
  n = len(texts)
  tf = sp.csr_matrix((np.asarray(vals, np.float32), (rows, cols)), shape=(n, max(len(vocab), 1)))
  df = np.bincount(np.asarray(cols, np.int64), minlength=tf.shape[1])
  idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
  return _normalize_rows(tf @ sp.diags(idf))


def _normalize_rows(x):
  if sp.issparse(x):
    x = sp.csr_matrix(x, dtype=np.float32)
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    return sp.diags(1.0 / np.maximum(norms, 1e-12)).astype(np.float32) @ x
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_neighbours(embeddings, k: int = 10, chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k cosine neighbours of every row, itself excluded.

  Args:
    embeddings: [N, D] dense array or scipy sparse matrix (rows are L2-normalised here).
    k: neighbours per document (at most N − 1).
    chunk_size: rows of the similarity matrix computed at once.

  Returns:
    (indices <int64>[N, k'], similarities <float32>[N, k']) with k' = min(k, N − 1), most similar first
    (ties: lower index first).
  """
  x = _normalize_rows(embeddings)
  n = x.shape[0]
  k = min(k, n - 1)
  indices = np.zeros((n, max(k, 0)), np.int64)
  sims = np.zeros((n, max(k, 0)), np.float32)
  if k <= 0:
    return indices, sims
  for start in range(0, n, chunk_size):
    block = x[start:start + chunk_size] @ x.T  # [c, N]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    rows = np.arange(block.shape[0])
    block[rows, start + rows] = -np.inf  # never your own neighbour
    # Stable sort on −similarity: equal similarities keep index order.
    order = np.argsort(-block, axis=1, kind='stable')[:, :k]
    indices[start:start + block.shape[0]] = order
    sims[start:start + block.shape[0]] = np.take_along_axis(block, order, axis=1)
  return indices, sims


def knn_graph(indices: np.ndarray, sims: np.ndarray) -> list[dict[int, float]]:
  """Undirected weighted graph: an edge i–j when j is in i's top-k or i in j's; weight = cosine."""
  n = indices.shape[0]
  adjacency: list[dict[int, float]] = [{} for _ in range(n)]
  for i in range(n):
    for j, s in zip(indices[i].tolist(), sims[i].tolist()):
      adjacency[i][j] = s
      adjacency[j][i] = s
  return adjacency


def greedy_max_path(adjacency: Sequence[dict[int, float]]) -> list[int]:
  """ICLM's greedy path: every node once, moving to the most similar unvisited neighbour when possible.

  Args:
    adjacency: per node, {neighbour: similarity} (symmetric).

  Returns:
    A permutation of range(N).
  """
  n = len(adjacency)
  visited = np.zeros(n, bool)
  starts = [(len(adjacency[i]), i) for i in range(n)]  # (degree, index): min degree first, lowest index
  heapq.heapify(starts)
  order = []
  while len(order) < n:
    degree, current = heapq.heappop(starts)
    if visited[current]:
      continue
    while current is not None:
      visited[current] = True
      order.append(current)
      best, best_sim = None, -np.inf
      for j, s in adjacency[current].items():
        if not visited[j] and (s > best_sim or (s == best_sim and best is not None and j < best)):
          best, best_sim = j, s
      current = best
  return order


def similarity_order(texts: Sequence[str], *, k: int = 10,
                     embed: Optional[Callable[[Sequence[str]], object]] = None) -> list[int]:
  """The document order for Lory's similarity batching: embed, kNN graph, greedy path.

  Args:
    texts: the documents.
    k: neighbours per document in the graph.
    embed: texts -> [N, D] (dense or sparse); TF-IDF by default.

  Returns:
    A permutation of range(len(texts)).
  """
  if len(texts) == 0:
    return []
  embeddings = (embed or tfidf_embeddings)(texts)
  return greedy_max_path(knn_graph(*nearest_neighbours(embeddings, k)))


def pack_in_order(token_ids: Sequence[Sequence[int]], order: Sequence[int], length: int, *, eos_id: int = 1,
                  pad_id: int = 0, drop_remainder: bool = False) -> np.ndarray:
  """Concatenates documents in `order`, each followed by EOS, and cuts the stream into instances.

  Args:
    token_ids: per document, its token ids (without EOS).
    order: e.g. `similarity_order(texts)`.
    length: tokens per training instance.
    eos_id: separator appended to every document.
    pad_id: fills the last instance unless drop_remainder.
    drop_remainder: drop a last, incomplete instance instead of padding it.

  Returns:
    <int32>[num_instances, length].
  """
  if length < 1:
    raise ValueError(f'length must be >= 1, got {length}.')
  if sorted(order) != list(range(len(token_ids))):
    raise ValueError('order must be a permutation of the documents (each used exactly once).')
  stream = [t for i in order for t in list(token_ids[i]) + [eos_id]]
  num = len(stream) // length if drop_remainder else -(-len(stream) // length)
  stream = stream[:num * length] + [pad_id] * max(num * length - len(stream), 0)
  return np.asarray(stream, np.int32).reshape(num, length)


__all__ = ['tokenize', 'tfidf_embeddings', 'nearest_neighbours', 'knn_graph', 'greedy_max_path',
           'similarity_order', 'pack_in_order']
