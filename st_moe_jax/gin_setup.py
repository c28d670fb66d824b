"""Gin registrations, in one place at the edge: the math and model modules never import gin.

Importing this module registers the configurables the gin files under `gin/` name, under t5x-like
module prefixes (`models.EncoderDecoder`, `seqio.ByteVocabulary`, `utils.DatasetConfig`,
`optim.adafactor`, ...). The entry points' own functions (`train_script.train`, `eval_script.evaluate`,
`infer_script.infer`) are registered in their modules. Entry points import this module (through cli.py)
before parsing gin files; `parse_model_gin` is a helper for tools and tests.
"""

from typing import Iterable, Optional, Sequence

import flax.linen as nn
import gin
import seqio

from st_moe_jax import data
from st_moe_jax import models
from st_moe_jax import optim

for _cls in (models.EncoderDecoder, models.DecoderOnly, models.TransformerConfig, models.MoeConfig):
  gin.external_configurable(_cls, module='models')
gin.external_configurable(seqio.ByteVocabulary, module='seqio')
gin.external_configurable(seqio.SentencePieceVocabulary, module='seqio')
# The run files' names (gin/runs/*.gin, as in t5x).
gin.external_configurable(data.DatasetConfig, 'utils.DatasetConfig')
gin.external_configurable(optim.create_learning_rate_scheduler, 'utils.create_learning_rate_scheduler')
gin.external_configurable(optim.adafactor, 'optim.adafactor')


def parse_model_gin(gin_files: Sequence[str], bindings: Iterable[str] = (),
                    search_paths: Sequence[str] = ('.',)) -> None:
  """Clears gin and parses model gin files (+ bindings such as "NUM_EXPERTS = 4"), t5x style.

  search_paths: folders prepended to relative `include` / gin_file paths (t5x's --gin_search_paths).
  """
  gin.clear_config()
  for path in search_paths:
    gin.add_config_file_search_path(path)
  gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=False)


def architecture(name: str = 'ARCHITECTURE') -> nn.Module:
  """The flax module a parsed model gin binds to the macro `name`."""
  return gin.query_parameter(f'{name}/macro.value').scoped_configurable_fn()


def macro(name: str, default: Optional[object] = None):
  """The value of a gin macro after parsing (default if unbound)."""
  try:
    value = gin.query_parameter(f'{name}/macro.value')
  except ValueError:
    return default
  return value.scoped_configurable_fn() if isinstance(value, gin.config.ConfigurableReference) else value
