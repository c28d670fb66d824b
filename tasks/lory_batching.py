"""Similarity-based data batching for Lory (docs/seed_methods.md §3.4; In-Context Pretraining, Shi et al. 2024).

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
  5. concatenate the documents in that order with EOS separators and cut the stream into fixed-length
     training sequences.

As a seqio data step, `order_by_similarity` is a preprocessor that does 1–4 over a split and emits its
documents in walk order; the task's usual steps then do 5 (tokenize, append EOS, `lm_chunks`, the feature
converter's packing). `tasks/pretraining.py` registers it as the `*_lm_similarity` tasks. The same steps on
plain arrays: `similarity_order` and `pack_in_order`.

Exact search is O(N²·D) in blocks: fine up to ~10⁵ documents; beyond that use an approximate index.
"""

import collections
import hashlib
import heapq
import math
import re
from typing import Callable, Optional, Sequence, Union

import numpy as np
import scipy.sparse as sp
import tensorflow as tf

from tasks import common

# Neighbours per document in the kNN graph (our choice; neither Lory nor ICLM gives k).
DEFAULT_K = 10
# Similarities computed at once by the exact kNN search (float32: 128 MiB).
MAX_BLOCK_ELEMENTS = 1 << 25
# Walks kept per process, keyed by k, embed and the documents' digest: building a task's dataset again (the
# trimming probe in st_moe_jax/data.py, a rebuilt pipeline) reads the split again but skips the search.
ORDER_CACHE_SIZE = 8
_ORDER_CACHE: 'collections.OrderedDict[tuple, list[int]]' = collections.OrderedDict()

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


def nearest_neighbours(embeddings, k: int = DEFAULT_K,
                       chunk_size: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k cosine neighbours of every row, itself excluded.

  Args:
    embeddings: [N, D] dense array or scipy sparse matrix (rows are L2-normalised here).
    k: neighbours per document (at most N − 1 are returned).
    chunk_size: rows of the similarity matrix computed at once; None: at most 1024 rows and at most
      MAX_BLOCK_ELEMENTS similarities (the working memory of the search, about 4 · that many bytes).

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
  if chunk_size is None:
    chunk_size = max(1, min(1024, MAX_BLOCK_ELEMENTS // n))
  # Transposed once: scipy would otherwise convert x.T to row-major again for every block.
  xt = x.T.tocsr() if sp.issparse(x) else x.T
  for start in range(0, n, chunk_size):
    block = x[start:start + chunk_size] @ xt  # [c, N]
    block = block.toarray() if sp.issparse(block) else np.array(block)
    rows = np.arange(block.shape[0])
    block[rows, start + rows] = -np.inf  # never your own neighbour
    idx, sim = _top_k(block, k)
    indices[start:start + block.shape[0]] = idx
    sims[start:start + block.shape[0]] = sim
  return indices, sims


def _top_k(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Per row, the k largest entries, largest first, equal values in index order.

  Same result as a stable full sort on −block, without sorting whole rows: every entry at least as large
  as the row's k-th largest is a candidate (more than k only when values tie at the boundary), and only
  the candidates are sorted.
  """
  kth = -np.partition(-block, k - 1, axis=1)[:, k - 1]
  idx = np.empty((block.shape[0], k), np.int64)
  for r in range(block.shape[0]):
    candidates = np.flatnonzero(block[r] >= kth[r])  # ascending index
    idx[r] = candidates[np.argsort(-block[r, candidates], kind='stable')[:k]]
  return idx, np.take_along_axis(block, idx, axis=1).astype(np.float32)


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


def check_k(k) -> int:
  """k as an int, or a ValueError that says what to pass."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f'k (neighbours per document in the similarity graph) must be an integer >= 1, got '
                     f'{k!r}; the paper\'s recipe uses about 10.')
  return int(k)


def similarity_order(texts: Sequence[str], *, k: int = DEFAULT_K,
                     embed: Optional[Callable[[Sequence[str]], object]] = None) -> list[int]:
  """The document order for Lory's similarity batching: embed, kNN graph, greedy path.

  Args:
    texts: the documents.
    k: neighbours per document in the graph (>= 1).
    embed: texts -> [N, D] (dense or sparse); TF-IDF by default.

  Returns:
    A permutation of range(len(texts)).
  """
  k = check_k(k)
  if len(texts) == 0:
    return []
  embeddings = (embed or tfidf_embeddings)(texts)
  return greedy_max_path(knn_graph(*nearest_neighbours(embeddings, k)))


def order_by_similarity(dataset: tf.data.Dataset, *, k: Union[int, Callable[[], int]] = DEFAULT_K,
                        text_key: str = 'text', group_key: Optional[str] = None,
                        embed: Optional[Callable[[Sequence[str]], object]] = None) -> tf.data.Dataset:
  """seqio preprocessor: the split's documents, each once, in the greedy walk order over their kNN graph.

  A document is one example, or with `group_key` all examples with the same value of that feature (e.g.
  the segments of one file), embedded as one text and kept together in the order the source yields them.
  Put this step first, on the raw text (before `tokenize`), and let the task's later steps pack: documents
  are concatenated in this order and cut into training sequences (the LM tasks' `lm_chunks`, then the
  feature converter), so a sequence holds documents that are similar to each other.

  Order and determinism: the documents are first sorted by content (text, then the other features), and
  the walk runs on that canonical order. The result depends only on the multiset of documents, not on the
  order the source yields them in (a source shuffle with any seed gives the same walk), so every build,
  and a run resumed from a checkpoint, sees the same stream. It is the same every epoch; to shuffle, let
  the Task shuffle the packed sequences (seqio's `shuffle=True` does that after all preprocessors), which
  keeps neighbouring documents together inside each sequence.

  Scope and memory: this is a global step over what the source yields for this split (this process's
  shard when seqio shards at the source) and it is eager: the first dataset build reads the whole split
  into memory and keeps it in the tf.data graph as constants (about 2–3× the split's text), builds its
  TF-IDF matrix (sparse: ~12 bytes per distinct (document, word) pair) and searches neighbours exactly in
  blocks of at most MAX_BLOCK_ELEMENTS similarities, O(N²) time for N documents. That suits the embedded
  corpus (30 MB in about 1 700 files: seconds) and text directories up to ~10⁵ documents; it is not meant
  for C4. The train and validation splits are ordered separately, so no document crosses the split.

  Args:
    dataset: examples of scalar features, with the text under `text_key`.
    k: neighbours per document in the graph (>= 1), or a callable giving it when the dataset is built
      (e.g. a gin-configurable function).
    text_key: the feature holding the text.
    group_key: a feature whose equal values mark the examples of one document; None: one per example.
    embed: texts -> [N, D] embeddings (dense or sparse); TF-IDF by default.

  Returns:
    A dataset of the same examples (same features, dtypes, multiset), in walk order.

  Raises:
    ValueError: k < 1, no `text_key` or `group_key` feature, or a non-scalar feature (after tokenize?).
    common.MissingDataError: the split (or shard) has no documents.
  """
  k = check_k(k() if callable(k) else k)
  spec = dataset.element_spec
  for key in (text_key, group_key):
    if key is not None and (not isinstance(spec, dict) or key not in spec):
      raise ValueError(f'order_by_similarity needs a {key!r} feature; the examples have '
                       f'{sorted(spec) if isinstance(spec, dict) else spec}.')
  for name, feature in spec.items():
    if feature.shape.rank != 0:
      raise ValueError(f'order_by_similarity orders documents, one per example, and needs scalar features; '
                       f'{name!r} has shape {feature.shape}. Put it before `tokenize` in the preprocessors.')
  names = [text_key] + sorted(n for n in spec if n != text_key)
  columns = {name: [] for name in names}
  for example in dataset.as_numpy_iterator():
    for name in names:
      columns[name].append(example[name])
  if not columns[text_key]:
    raise common.MissingDataError(
        'order_by_similarity got no documents: the split (or this process\'s shard of it) is empty. Check '
        'the split name and that the source has data for it.')

  # Documents as lists of example indices; a group keeps the order its examples came in.
  if group_key is None:
    documents = [[i] for i in range(len(columns[text_key]))]
  else:
    groups = collections.defaultdict(list)
    for i, value in enumerate(columns[group_key]):
      groups[_as_bytes(value)].append(i)
    documents = list(groups.values())

  def content(document):
    return tuple(tuple(_as_bytes(columns[name][i]) for name in names) for i in document)

  contents = [content(d) for d in documents]
  canonical = sorted(range(len(documents)), key=contents.__getitem__)
  digest = hashlib.sha256()
  for d in canonical:
    digest.update(len(contents[d]).to_bytes(8, 'little'))
    for part in (p for example in contents[d] for p in example):
      digest.update(len(part).to_bytes(8, 'little') + part)
  cache_key = (k, embed, digest.hexdigest())
  walk = _ORDER_CACHE.get(cache_key)
  if walk is None:
    texts = ['\n'.join(_as_bytes(columns[text_key][i]).decode('utf-8', errors='replace')
                       for i in documents[d]) for d in canonical]
    walk = similarity_order(texts, k=k, embed=embed)
    _ORDER_CACHE[cache_key] = walk
    while len(_ORDER_CACHE) > ORDER_CACHE_SIZE:
      _ORDER_CACHE.popitem(last=False)
  order = [i for j in walk for i in documents[canonical[j]]]
  return tf.data.Dataset.from_tensor_slices(
      {name: tf.constant([columns[name][i] for i in order], spec[name].dtype) for name in names})


def _as_bytes(value) -> bytes:
  """A scalar feature value as bytes: strings as they are, numbers by their machine representation."""
  return value if isinstance(value, bytes) else np.asarray(value).tobytes()


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


__all__ = ['DEFAULT_K', 'tokenize', 'tfidf_embeddings', 'nearest_neighbours', 'knn_graph',
           'greedy_max_path', 'check_k', 'similarity_order', 'order_by_similarity', 'pack_in_order']
