"""What the three entry points (train.py, evaluate.py, infer.py) share: t5x-style flags, gin parsing, the
mesh, the model's kind, and turning bad input into a clear message (exit status 2) instead of a stack trace.

Flags: --gin_file (repeatable; later files override earlier ones), --gin_bindings (repeatable),
--gin.NAME=VALUE (rewritten to --gin_bindings=NAME=VALUE), --gin_search_paths (comma-separated, default
'.'), --tfds_data_dir, and for multi-host --coordinator_address --process_count --process_index (or the
environment variables JAX_COORDINATOR_ADDRESS / JAX_PROCESS_COUNT / JAX_PROCESS_INDEX) with
--initialization_timeout and --heartbeat_timeout_seconds. --debug (or ST_MOE_DEBUG=1) shows the stack trace
of a bad-input error instead of the one-line message.
"""

import argparse
import ast
import difflib
import logging
import os
import re
import socket
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import gin

from st_moe_jax import checkpoint_manager as ckpt_lib
from st_moe_jax import config as config_lib
from st_moe_jax import data as data_lib
from st_moe_jax import fileio
from st_moe_jax import gin_setup  # pylint: disable=unused-import  (the registrations gin files name)
from st_moe_jax import models
from st_moe_jax import partitioning
from st_moe_jax import trainer as trainer_lib


class UserError(Exception):
  """Bad input from the command line or gin; the entry point prints the message and exits with 2."""


# ---------------------------------------------------------------------------------------------------------
# Flags and gin.

def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """--gin.NAME=VALUE → --gin_bindings=NAME=VALUE (t5x's gin_utils.rewrite_gin_args)."""
  out = []
  for arg in argv:
    if arg.startswith('--gin.'):
      name, sep, value = arg[len('--gin.'):].partition('=')
      if not sep:
        raise UserError(f'{arg}: expected --gin.NAME=VALUE.')
      arg = f'--gin_bindings={name} = {value}'
    out.append(arg)
  return out


def parse_flags(argv: Sequence[str], description: str,
                add_flags: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.Namespace:
  """The shared flags, plus whatever `add_flags(parser)` adds (e.g. compile_tpu's --topology)."""
  parser = argparse.ArgumentParser(description=description)
  if add_flags is not None:
    add_flags(parser)
  parser.add_argument('--gin_file', action='append', default=[], help='gin file (repeatable)')
  parser.add_argument('--gin_bindings', action='append', default=[], help='gin binding (repeatable)')
  parser.add_argument('--gin_search_paths', default='.', help='comma-separated folders for gin files')
  parser.add_argument('--tfds_data_dir', default=None)
  parser.add_argument('--coordinator_address', default=os.environ.get('JAX_COORDINATOR_ADDRESS'))
  parser.add_argument('--process_count', type=int, default=_env_int('JAX_PROCESS_COUNT'))
  parser.add_argument('--process_index', type=int, default=_env_int('JAX_PROCESS_INDEX'))
  # jax.distributed's own defaults; set explicitly so a lost peer or coordinator ends the run, never a hang.
  parser.add_argument('--initialization_timeout', type=int, default=300,
                      help='seconds to wait for all processes to reach the coordinator')
  parser.add_argument('--heartbeat_timeout_seconds', type=int, default=100,
                      help='seconds without heartbeats after which a process counts as dead and the others '
                      'stop')
  parser.add_argument('--multiprocess_gpu', action='store_true', help='accepted for t5x compatibility')
  parser.add_argument('--alsologtostderr', action='store_true', help='accepted for t5x compatibility')
  parser.add_argument('--debug', action='store_true',
                      help='show the stack trace of bad-input errors (also ST_MOE_DEBUG=1)')
  return parser.parse_args(rewrite_gin_args(argv))


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  return int(value) if value else None


def init_distributed(flags: argparse.Namespace) -> None:
  """jax.distributed.initialize when a coordinator is given (multi-host); a no-op otherwise."""
  if not flags.coordinator_address:
    return
  import jax  # pylint: disable=g-import-not-at-top
  if flags.process_count is None or flags.process_index is None:
    raise UserError('--coordinator_address needs --process_count and --process_index (or JAX_PROCESS_COUNT '
                    'and JAX_PROCESS_INDEX).')
  if not 0 <= flags.process_index < flags.process_count:
    raise UserError(f'--process_index={flags.process_index} must be in [0, --process_count='
                    f'{flags.process_count}).')
  # On CPU, jax 0.10 joins the processes' devices with gloo collectives (jax_cpu_collectives_implementation's
  # default), through the distributed client set up here.
  if flags.process_index != 0:  # process 0 serves the coordinator itself
    wait_for_coordinator(flags)
  # A peer that dies later: a collective that fails at once gives run_main's one line; one that keeps waiting
  # (gloo has no timeout) is ended by jaxlib once the peer misses --heartbeat_timeout_seconds of heartbeats
  # ('Terminating process because the JAX distributed service detected fatal errors'), never a hang. jaxlib's
  # missed_heartbeat_callback cannot replace that message from Python (it aborts on casting the status).
  jax.distributed.initialize(flags.coordinator_address, flags.process_count, flags.process_index,
                             initialization_timeout=flags.initialization_timeout,
                             heartbeat_timeout_seconds=flags.heartbeat_timeout_seconds)


def wait_for_coordinator(flags: argparse.Namespace) -> None:
  """Waits (up to --initialization_timeout) until the coordinator's port accepts connections; UserError naming
  the address if it never does. jaxlib would abort the process with a C++ stack trace instead."""
  host, _, port = flags.coordinator_address.rpartition(':')
  if not host or not port.isdigit():
    raise UserError(f'--coordinator_address={flags.coordinator_address} must be HOST:PORT (process 0\'s host), '
                    'e.g. --coordinator_address=10.0.0.2:8476.')
  deadline = time.monotonic() + flags.initialization_timeout
  while True:
    try:
      socket.create_connection((host.strip('[]'), int(port)), timeout=5).close()
      return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise UserError(f'Process {flags.process_index} of {flags.process_count} could not reach the JAX '
                        f'coordinator at --coordinator_address={flags.coordinator_address} within '
                        f'--initialization_timeout={flags.initialization_timeout}s ({e.strerror or e}): check '
                        'the address is process 0\'s host:port and reachable, and that process 0 was started.'
                        ) from e
      time.sleep(0.5)


def _referenced_macros() -> set[str]:
  """Macro names some binding refers to (%NAME), after parsing."""
  found = set()

  def visit(value):
    if isinstance(value, gin.config.ConfigurableReference):
      if value.selector == 'gin.macro':
        found.add(value.scoped_selector.rsplit('/', 1)[0])
    elif isinstance(value, dict):
      for v in value.values():
        visit(v)
    elif isinstance(value, (list, tuple)):
      for v in value:
        visit(v)

  for bindings in gin.config._CONFIG.values():
    visit(bindings)
  return found


def _defined_macros() -> set[str]:
  return {scope for (scope, selector) in gin.config._CONFIG if selector == 'gin.macro'}


def check_macro_names(bindings: Sequence[str]) -> None:
  """A --gin.NAME for an all-caps NAME that no gin file defines or uses is a misspelt macro."""
  known = _referenced_macros() | _defined_macros_from_files()
  for binding in bindings:
    name = binding.split('=', 1)[0].strip()
    if name.isupper() and '.' not in name and '/' not in name and name not in known:
      close = difflib.get_close_matches(name, sorted(known), n=3)
      hint = f' Did you mean {", ".join(close)}?' if close else ''
      raise UserError(f'Unknown gin macro {name!r} in --gin.{name} / --gin_bindings: no gin file defines or '
                      f'uses it, so it would be silently ignored.{hint}')


_FILE_MACROS: set[str] = set()


def _defined_macros_from_files() -> set[str]:
  return _FILE_MACROS


def _remote_gin_file(path: str) -> bool:
  return fileio.is_remote(path) and fileio.exists(path)


# gin reads a --gin_file=gs://... (and its includes) through the path layer.
gin.config.register_file_reader(fileio.open, _remote_gin_file)


def parse_gin(flags: argparse.Namespace, required_defaults: Optional[Mapping[str, str]] = None) -> None:
  """Parses --gin_file files then --gin_bindings; gin's own message (with the file and line) on error.
  Then checks what gin would only find later, with a stack trace: no model file, misspelt or unset
  REQUIRED macros.

  required_defaults: {MACRO: value} bound after the files and before --gin_bindings, for each MACRO the
    files leave REQUIRED (a tool that needs no MODEL_DIR, e.g. compile_tpu, sets it to None).
  """
  gin.clear_config()
  for path in flags.gin_search_paths.split(','):
    if path:
      gin.add_config_file_search_path(path)
  files = [_resolve(f, flags.gin_search_paths) for f in flags.gin_file]
  if not files:
    raise UserError('No --gin_file given: pass a run config (gin/runs/pretrain.gin, ...) and a model '
                    '(gin/models/st_moe_tiny.gin, ...).')
  try:
    gin.parse_config_files_and_bindings(files, [], finalize_config=False)
  except (ValueError, IOError, SyntaxError, ImportError) as e:
    raise UserError(f'gin could not parse the configuration: {e}') from e
  _FILE_MACROS.clear()
  _FILE_MACROS.update(_defined_macros())
  defaults = [f'{name} = {value}' for name, value in (required_defaults or {}).items()
              if _is_required(_macro_binding(name))]
  if defaults:
    gin.parse_config_files_and_bindings([], defaults, finalize_config=False)
  try:
    gin.parse_config_files_and_bindings([], flags.gin_bindings, finalize_config=False)
  except (ValueError, IOError, SyntaxError, ImportError) as e:
    check_string_quotes(flags.gin_bindings)
    raise UserError(f'gin could not parse the configuration: {e}') from e
  check_model_file()
  check_macro_names(flags.gin_bindings)
  check_required_macros()


def check_string_quotes(bindings: Sequence[str]) -> None:
  """A binding whose value is a bare word or path (--gin.MODEL_DIR=runs/x) lost its quotes to the shell."""
  for binding in bindings:
    name, _, value = binding.partition('=')
    value = value.strip()
    if not value or value[0] in '\'"[{(%@-+.' or value[0].isdigit() or value in ('True', 'False', 'None'):
      continue
    try:
      ast.literal_eval(value)
    except (ValueError, SyntaxError):
      name = name.strip()
      raise UserError(f'--gin.{name}={value}: a string value needs inner quotes (the shell removes the '
                      f'outer ones): --gin.{name}="\'{value}\'".') from None


# Macros every gin/models/ file defines (moe_architecture.gin) and the run files use.
MODEL_MACROS = ('ARCHITECTURE', 'NUM_EXPERTS')


def check_model_file() -> None:
  missing = [m for m in MODEL_MACROS if m in _referenced_macros() and m not in _FILE_MACROS]
  if missing:
    raise UserError('no model gin file: add --gin_file=gin/models/st_moe_tiny.gin (or another file in '
                    f'gin/models/); no gin file defines {", ".join(missing)}.')


# Example values for the REQUIRED macros of gin/runs/*.gin (encoder-decoder; decoder-only below).
REQUIRED_EXAMPLES = {
    'MODEL_DIR': '"\'runs/my_run\'"',
    'MIXTURE_OR_TASK_NAME': '"\'stdlib_span_corruption\'"',
    'TASK_FEATURE_LENGTHS': '"{\'inputs\': 256, \'targets\': 64}"',
    'TRAIN_STEPS': '1000',
    'CHECKPOINT_PATH': '"\'runs/my_run\'"',
    'EVAL_OUTPUT_DIR': '"\'runs/my_run/eval\'"',
    'INFER_OUTPUT_DIR': '"\'runs/my_run/infer\'"',
    'INITIAL_CHECKPOINT_PATH': '"\'runs/pretrained/checkpoint_100000\'"',
}
DECODER_ONLY_EXAMPLES = {
    'MIXTURE_OR_TASK_NAME': '"\'stdlib_lm\'"',
    'TASK_FEATURE_LENGTHS': '"{\'targets\': 256}"',
}


def _is_required(value: Any) -> bool:
  return (isinstance(value, gin.config.ConfigurableReference) and value.selector == 'gin.constant'
          and value.scoped_selector.startswith('gin.REQUIRED'))


def _macro_binding(name: str) -> Any:
  return gin.config._CONFIG.get((name, 'gin.macro'), {}).get('value')  # pylint: disable=protected-access


def _architecture_is_decoder_only() -> bool:
  value = _macro_binding('ARCHITECTURE')
  return isinstance(value, gin.config.ConfigurableReference) and value.selector.endswith('DecoderOnly')


def check_required_macros() -> None:
  """Every macro still `%gin.REQUIRED` that a binding uses: one line naming each, with an example."""
  used = _referenced_macros()
  unset = [name for (name, selector), bindings in gin.config._CONFIG.items()  # pylint: disable=protected-access
           if selector == 'gin.macro' and name in used and _is_required(bindings.get('value'))]
  # TRAIN_STEPS_RELATIVE (finetune.gin) counts the steps from the checkpoint instead.
  if 'TRAIN_STEPS' in unset and _macro_binding('TRAIN_STEPS_RELATIVE') is not None:
    unset.remove('TRAIN_STEPS')
  if not unset:
    return
  examples = dict(REQUIRED_EXAMPLES)
  if _architecture_is_decoder_only():
    examples.update(DECODER_ONLY_EXAMPLES)
  passes = ' '.join(f'--gin.{name}={examples.get(name, "VALUE")}' for name in unset)
  names = unset[0] if len(unset) == 1 else f'{", ".join(unset[:-1])} and {unset[-1]}'
  verb = 'is' if len(unset) == 1 else 'are'
  raise UserError(f'{names} {verb} required (REQUIRED in the run gin file): pass {passes}')


def _resolve(path: str, search_paths: str) -> str:
  """A relative --gin_file is looked up under each --gin_search_paths folder (first hit wins)."""
  if os.path.isabs(path) or fileio.is_remote(path) or fileio.exists(path):
    return path
  for root in search_paths.split(','):
    candidate = fileio.join(root, path)
    if fileio.exists(candidate):
      return candidate
  raise UserError(f'gin file {path!r} not found (searched {search_paths!r}; set --gin_search_paths).')


# ---------------------------------------------------------------------------------------------------------
# Running an entry point.

class _GinSearchNoise(logging.Filter):
  """gin logs an ERROR 'Path not found: ...' for each search path a relative gin file is not under before it
  tries the next (e.g. from another folder with --gin_search_paths); a file found nowhere still fails."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Path not found: ')


_GIN_SEARCH_NOISE = _GinSearchNoise()


def run_main(main: Callable[[argparse.Namespace], Any], description: str,
             argv: Optional[Sequence[str]] = None, *,
             add_flags: Optional[Callable[[argparse.ArgumentParser], None]] = None,
             required_defaults: Optional[Mapping[str, str]] = None) -> None:
  """Parses flags and gin, runs `main`, and prints bad-input errors without a stack trace (exit 2);
  --debug or ST_MOE_DEBUG=1 re-raises them instead, to show the trace. add_flags / required_defaults:
  see parse_flags / parse_gin."""
  from tasks import common  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  logging.getLogger('absl').setLevel(logging.ERROR)
  logging.getLogger().addFilter(_GIN_SEARCH_NOISE)
  argv = sys.argv[1:] if argv is None else list(argv)
  # Read before parsing: a bad flag can fail the parse itself.
  debug = '--debug' in argv or os.environ.get('ST_MOE_DEBUG') == '1'
  try:
    flags = parse_flags(argv, description, add_flags)
    if flags.tfds_data_dir:
      os.environ['TFDS_DATA_DIR'] = flags.tfds_data_dir
    init_distributed(flags)
    parse_gin(flags, required_defaults)
    main(flags)
  except (UserError, common.TaskInputError, ckpt_lib.CheckpointShapeError, ckpt_lib.CheckpointCorruptError,
          ckpt_lib.ProcessCountError, trainer_lib.TrainingDivergedError) as e:
    if debug:
      raise
    # gin appends "In call to configurable ..." lines; the message itself says what to change.
    message = '\n'.join(line for line in str(e).splitlines()
                        if not line.strip().startswith('In call to configurable'))
    print(f'ERROR: {message}', file=sys.stderr)
    sys.exit(2)
  except Exception as e:  # pylint: disable=broad-except
    if debug or not _peer_failure(e):
      raise
    # One line, then exit at once: jax's exit hook would wait on the dead peer at the shutdown barrier and
    # abort with a C++ stack trace.
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    print(f'ERROR: process {flags.process_index} of {flags.process_count}: a step shared with the other '
          f'processes failed ({reason}). Another process most likely died (see its log; a process that '
          f'sends no heartbeat for --heartbeat_timeout_seconds={flags.heartbeat_timeout_seconds} counts as '
          'dead); rerun the same command to resume from the last checkpoint.', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access


def _peer_failure(error: BaseException) -> bool:
  """A JAX runtime error in a multi-process run (a collective or the coordination service lost a peer)."""
  if 'jax' not in sys.modules:
    return False
  import jax  # pylint: disable=g-import-not-at-top
  return (jax.distributed.is_initialized() and jax.process_count() > 1
          and isinstance(error, jax.errors.JaxRuntimeError))


def call_configurable(fn: Callable[[], Any], name: str) -> Any:
  """Calls a gin configurable, turning missing REQUIRED macros, undefined macros and bad parameters into
  UserError."""
  try:
    return fn()
  except config_lib.ConfigError as e:  # a model setting from gin: its message names the field and the fix
    raise UserError(_first_line(str(e))) from e
  except (ValueError, TypeError) as e:
    message = str(e)
    # A %MACRO no gin file defines: gin calls macro() without a value, "... in scope 'NAME'".
    undefined = re.search(r"configurable 'macro' .* in scope '([^']+)'", message)
    if undefined:
      macro = undefined.group(1)
      raise UserError(f'{macro} is not set: a gin file uses %{macro} but none defines it; pass '
                      f'--gin.{macro}=VALUE or add the gin file that defines it.') from e
    if 'Required bindings' in message or 'gin.REQUIRED' in message or 'REQUIRED' in message:
      raise UserError(f'{name}: a required macro is not set ({_first_line(message)}). Set it with '
                      f'--gin.MACRO=value; the REQUIRED macros are listed at the top of the run gin file '
                      f'(e.g. --gin.MODEL_DIR="\'runs/demo\'").') from e
    raise


def _first_line(message: str) -> str:
  return message.strip().splitlines()[0]


def required(value: Any, macro: str, example: str) -> Any:
  if value is None or value is gin.REQUIRED:
    raise UserError(f'{macro} is required: pass --gin.{macro}={example}.')
  return value


# ---------------------------------------------------------------------------------------------------------
# The model and the mesh.

def create_mesh(num_expert_partitions: int, num_model_partitions: int, model: Any,
                devices: Optional[Sequence[Any]] = None):
  """The mesh over `devices` (default: all), after checking each MoE stack's experts divide evenly over
  the expert partitions."""
  try:
    mesh = partitioning.create_mesh(devices, num_expert_partitions=num_expert_partitions,
                                    num_model_partitions=num_model_partitions)
    for num_experts in sorted({moe.num_experts for moe in moe_configs(model)}):
      partitioning.check_num_experts(num_experts, num_expert_partitions, mesh)
  except ValueError as e:
    raise UserError(str(e)) from e
  return mesh


MOE_FIELDS = ('encoder_moe', 'decoder_moe', 'moe')


def with_expert_replicas(model: Any, mesh) -> Any:
  """`model` with each MoeConfig's num_expert_replicas derived from the mesh, as flaxformer does: devices ÷
  (expert partitions × model partitions), so the number of routing groups is a multiple of E × replicas
  and the groups split evenly over the ('expert', 'data') batch shards (otherwise XLA gathers tokens across
  shards instead of one all-to-all; docs/routing.md §5). A value set by hand (NUM_EXPERT_REPLICAS > 1) is
  kept."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  replicas = partitioning.num_expert_replicas(mesh)
  changes = {}
  for name in MOE_FIELDS:
    moe = getattr(model, name, None)
    if moe is not None and moe.num_expert_replicas == 1 and replicas != 1:
      changes[name] = dataclasses.replace(moe, num_expert_replicas=replicas)
  return model.clone(**changes) if changes else model


def moe_configs(model: Any) -> list[Any]:
  """The model's MoeConfigs that have sparse layers (encoder_moe / decoder_moe, or a decoder-only's moe)."""
  moes = [getattr(model, name, None) for name in MOE_FIELDS]
  return [moe for moe in moes if moe is not None and moe.num_sparse_layers > 0]


def model_kind(model: Any) -> str:
  """data.ENCODER_DECODER or data.DECODER_ONLY: which batch features (feature converter) the model takes."""
  if isinstance(model, models.EncoderDecoder):
    return data_lib.ENCODER_DECODER
  if isinstance(model, models.DecoderOnly):
    return data_lib.DECODER_ONLY
  raise UserError(f'ARCHITECTURE must be models.EncoderDecoder or models.DecoderOnly, got '
                  f'{type(model).__name__}.')


def check_task_fits_model(cfg: data_lib.DatasetConfig, kind: str) -> None:
  """The task's features against the model's kind and TASK_FEATURE_LENGTHS' keys, before seqio's feature
  converter fails on them with a stack trace. Decoder-only tasks (`_lm`) have only 'targets'; encoder-
  decoder tasks have 'inputs' and 'targets' (tasks.common.output_features)."""
  from tasks import common  # pylint: disable=g-import-not-at-top
  name = cfg.mixture_or_task_name
  features = common.get_task_or_mixture(name).output_features
  if kind == data_lib.ENCODER_DECODER and 'inputs' not in features:
    raise UserError(f"{name!r} is a decoder-only task (only 'targets') but the model is an encoder-decoder: "
                    'add --gin_file=gin/runs/decoder_only.gin after the model file, or use an '
                    "encoder-decoder task (e.g. 'stdlib_span_corruption').")
  if kind == data_lib.DECODER_ONLY and 'inputs' in features:
    raise UserError(f"{name!r} is an encoder-decoder task ('inputs' and 'targets') but the model is "
                    'decoder-only (gin/runs/decoder_only.gin): leave out gin/runs/decoder_only.gin, or use a '
                    "decoder-only task (e.g. 'stdlib_lm').")
  if kind == data_lib.ENCODER_DECODER:
    needed, rule = ('inputs', 'targets'), "encoder-decoder tasks need 'inputs' and 'targets'"
    example = '"{\'inputs\': 256, \'targets\': 64}"'
  else:
    needed, rule = ('targets',), "decoder-only tasks have only 'targets'"
    example = '"{\'targets\': 256}"'
  lengths = cfg.task_feature_lengths
  if (not isinstance(lengths, Mapping) or any(k not in lengths for k in needed)
      or any(k not in needed for k in lengths)):
    raise UserError(f'TASK_FEATURE_LENGTHS={lengths!r} does not fit {name!r}: {rule}, e.g. '
                    f'--gin.TASK_FEATURE_LENGTHS={example}.')


def check_checkpoint_path(path: str) -> None:
  """CHECKPOINT_PATH / INITIAL_CHECKPOINT_PATH names a checkpoint or a MODEL_DIR with one, checked before
  anything is built."""
  try:
    ckpt_lib.resolve_checkpoint_dir(path)
  except FileNotFoundError as e:
    raise UserError(str(e)) from e


def check_batch(batch_size: int, mesh) -> None:
  # tf.data fails on a batch of 0 deep inside its C++ code.
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
    raise UserError(f'BATCH_SIZE={batch_size!r} must be a positive whole number, e.g. --gin.BATCH_SIZE=32.')
  try:
    partitioning.check_batch_size(batch_size, mesh)
  except ValueError as e:
    raise UserError(str(e)) from e


def check_writable(path: str, macro: str) -> None:
  """Creates the output folder if missing and writes (then removes) a probe file in it, so that a
  read-only or impossible folder is found before the work whose results would go there, not after."""
  try:
    fileio.makedirs(path)
    # A uniquely named probe: every process of a multi-host run may check the same folder at once.
    with fileio.probe_file(path):
      pass
  except Exception as e:  # pylint: disable=broad-except  (gs:// errors come from TensorFlow's GCS client)
    if not isinstance(e, OSError) and not fileio.is_remote(path):
      raise
    message = str(e).strip()
    reason = getattr(e, 'strerror', None) or (message.splitlines()[0][:300] if message else type(e).__name__)
    filename = getattr(e, 'filename', None)
    where = (f' ({filename})' if filename and fileio.absolute(filename) != fileio.absolute(path) else '')
    raise UserError(f'{macro} {path} is not writable: {reason}{where}. Check the path and its permissions '
                    f'(and free disk space), or set --gin.{macro} to a writable folder.') from e
