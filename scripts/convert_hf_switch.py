"""Converts a HuggingFace Switch Transformers checkpoint into an orbax checkpoint our trainer can fine-tune.

  python scripts/convert_hf_switch.py --hf_dir DIR --out CHECKPOINT_DIR

DIR is a `save_pretrained` directory (config.json + model.safetensors or pytorch_model.bin). CHECKPOINT_DIR
gets `params/` (orbax PyTree checkpoint) and `model.gin` (the equivalent model bindings).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from st_moe_jax import hf_switch  # noqa: E402


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--hf_dir', required=True, help='directory written by save_pretrained')
  parser.add_argument('--out', required=True, help='output checkpoint directory')
  args = parser.parse_args(argv)
  model, params = hf_switch.import_hf_switch(args.hf_dir)
  hf_switch.save_params(params, args.out, model)
  num = sum(x.size for x in jax.tree_util.tree_leaves(params))
  print(f'Wrote {num:,} parameters to {args.out}/params and the model to {args.out}/model.gin')


if __name__ == '__main__':
  main()
