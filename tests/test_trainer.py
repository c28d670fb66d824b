"""trainer.py: resume equals an uninterrupted run (across processes), NaN stops without overwriting,
fine-tuning restores params partially, TensorBoard tags, evaluation sums."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK, LENGTHS, BATCH = 'stdlib_lm', {'targets': 32}, 8


def tiny_model(num_layers: int = 2):
  from st_moe_jax import models
  config = models.TransformerConfig(vocab_size=264, embed_dim=32, num_heads=2, head_dim=16, mlp_dim=48,
                                    num_encoder_layers=num_layers, num_decoder_layers=num_layers)
  moe = models.MoeConfig(num_sparse_layers=1, num_experts=4, expert_mlp_dim=32, extra_mlp=True,
                         group_size=64)
  return models.DecoderOnly(config, moe)


def make_trainer(learning_rate=None, num_layers: int = 2, num_devices: int = 1):
  """num_devices > 1: a (data 2, expert 4) mesh over the 8 simulated devices (expert partitions 4)."""
  import jax
  from st_moe_jax import data, optim, partitioning, trainer
  mesh = partitioning.create_mesh(jax.devices()[:num_devices], num_expert_partitions=4)
  schedule = learning_rate or optim.constant_schedule(0.01)
  return trainer.Trainer(tiny_model(num_layers), optim.adafactor, schedule, mesh, model_kind=data.DECODER_ONLY,
                         seed=0)


def make_data(split='train', seed=0):
  from st_moe_jax import data
  cfg = data.DatasetConfig(TASK, LENGTHS, split=split, batch_size=BATCH, seed=seed,
                           num_epochs=None if split == 'train' else 1, shuffle=split == 'train')
  return data.DataIterator(data.get_dataset(cfg, data.DECODER_ONLY, report_trimming=False))


def run_training(model_dir: str, steps: int, num_devices: int = 8, **loop_kwargs):
  """Trains to `steps` (resuming if model_dir has a checkpoint); saves the next batch to next_batch.npz."""
  from st_moe_jax import trainer
  train_data = make_data()
  loop = trainer.LoopConfig(steps, BATCH, log_period=3, eval_period=1000, checkpoint_period=3,
                            **loop_kwargs)
  state = trainer.fit(make_trainer(num_devices=num_devices), model_dir, train_data, loop,
                      print_fn=lambda _: None)
  np.savez(os.path.join(model_dir, f'next_batch_{steps}.npz'), **next(train_data))
  return state


def restored_params(model_dir: str, step: int):
  from st_moe_jax import checkpoint_manager
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer().restore(os.path.join(model_dir, f'checkpoint_{step}', 'params'))


def _subprocess_training(model_dir: str, steps: int) -> None:
  code = f'import tests.test_trainer as t; t.run_training({model_dir!r}, {steps})'
  env = {**os.environ, 'PYTHONPATH': REPO}
  subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, check=True, capture_output=True)


@pytest.mark.slow
def test_resume_in_fresh_process_matches_uninterrupted_run(tmp_path):
  import jax
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  run_training(straight, 6)
  _subprocess_training(resumed, 3)
  assert sorted(os.listdir(resumed)).count('checkpoint_3') == 1
  _subprocess_training(resumed, 6)  # a fresh process resumes from checkpoint_3
  a, b = restored_params(straight, 6), restored_params(resumed, 6)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)
  next_a = np.load(os.path.join(straight, 'next_batch_6.npz'))
  next_b = np.load(os.path.join(resumed, 'next_batch_6.npz'))
  assert set(next_a) == set(next_b)
  for k in next_a:
    np.testing.assert_array_equal(next_a[k], next_b[k])


@pytest.mark.slow
def test_nan_stops_training_and_keeps_last_good_checkpoint(tmp_path):
  """The NaN step is the last one: neither its forced final save nor an async one may write it."""
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from st_moe_jax import trainer
  # The update of step 4 (state.step 3) uses a NaN learning rate: its parameters are NaN.
  nan_after_3 = lambda step: jnp.where(step >= 3, jnp.nan, 0.01)
  model_dir = str(tmp_path / 'run')
  loop = trainer.LoopConfig(4, BATCH, log_period=100, eval_period=1000, checkpoint_period=3)
  with pytest.raises(trainer.TrainingDivergedError,
                     match=r'at step 4 \(non-finite: learning_rate, update\).*checkpoint_3, is untouched'):
    trainer.fit(make_trainer(nan_after_3), model_dir, make_data(), loop, print_fn=lambda _: None)
  assert sorted(d for d in os.listdir(model_dir) if d.startswith('checkpoint')) == ['checkpoint_3']
  params = ocp.PyTreeCheckpointer().restore(os.path.join(model_dir, 'checkpoint_3', 'params'))
  assert all(np.isfinite(x).all() for x in __import__('jax').tree.leaves(params))


@pytest.mark.slow
def test_finetune_restores_present_params_and_initialises_new_ones(tmp_path):
  import jax
  from st_moe_jax import checkpoint_manager as ckpt, trainer
  pretrained = str(tmp_path / 'pretrained')
  loop = trainer.LoopConfig(2, BATCH, log_period=100, eval_period=1000, checkpoint_period=2)
  trainer.fit(make_trainer(), pretrained, make_data(), loop, print_fn=lambda _: None)
  old = ckpt.flat_paths(restored_params(pretrained, 2))

  bigger = make_trainer(num_layers=4)  # two more decoder layers (layers_2, layers_3 are new)
  state = trainer.fit(bigger, str(tmp_path / 'finetuned'), make_data(),
                      trainer.LoopConfig(2, BATCH, log_period=100, eval_period=1000),
                      initial_checkpoint_path=pretrained, print_fn=lambda _: None)
  new = ckpt.flat_paths(jax.device_get(state.params))
  shared = [k for k in new if k in old and old[k].shape == new[k].shape]
  assert 'decoder/layers_0/self_attention/query/kernel' in shared
  assert any(k.startswith('decoder/layers_3') for k in new if k not in old)
  for k in shared:
    np.testing.assert_array_equal(new[k], old[k])
  assert int(state.step) == 2
  count = jax.tree.leaves(state.opt_state)[0]  # Adafactor's update count: a fresh optimizer state
  assert int(count) == 0
  assert int(trainer.schedule_count(state.opt_state)) == 2  # the learning-rate schedule goes on from step 2


@pytest.mark.slow
def test_finetuning_continues_the_learning_rate_schedule(tmp_path):
  """t5x evaluates the schedule at the global step: fine-tuning from checkpoint_2 updates with schedule(2),
  schedule(3) (logged at steps 3 and 4), not with a fresh optimizer's schedule(0), schedule(1)."""
  from st_moe_jax import optim, trainer
  schedule = optim.create_learning_rate_scheduler('constant * linear_warmup', 0.01, warmup_steps=10)
  pretrained, finetuned, lines = str(tmp_path / 'pretrained'), str(tmp_path / 'finetuned'), []
  trainer.fit(make_trainer(schedule), pretrained, make_data(),
              trainer.LoopConfig(2, BATCH, log_period=100, eval_period=1000, checkpoint_period=2),
              print_fn=lambda _: None)
  trainer.fit(make_trainer(schedule), finetuned, make_data(),
              trainer.LoopConfig(4, BATCH, log_period=1, eval_period=1000, checkpoint_period=100),
              initial_checkpoint_path=pretrained, print_fn=lines.append)
  np.testing.assert_allclose(read_tags(os.path.join(finetuned, 'train'))['learning_rate'],
                             [float(schedule(2)), float(schedule(3))], rtol=1e-6)
  assert any(line.startswith('step      3/4') and 'lr 2.00e-03' in line for line in lines), lines


def test_checkpoint_of_other_shape_lists_mismatched_params(tmp_path):
  import jax
  from st_moe_jax import checkpoint_manager as ckpt, trainer
  model_dir = str(tmp_path / 'run')
  tr = make_trainer()
  trainer.fit(tr, model_dir, make_data(), trainer.LoopConfig(1, BATCH, log_period=100, eval_period=1000),
              print_fn=lambda _: None)
  other = make_trainer()
  other.model = other.model.clone(config=dataclasses.replace(other.model.config, embed_dim=48))
  other.prepare(next(make_data()))
  with pytest.raises(ckpt.CheckpointShapeError, match=r'26 parameters with other shapes:\n  decoder/decoder_norm/scale: checkpoint \(32,\) '
                                                      r'vs model \(48,\)'):
    ckpt.restore_params(model_dir, other.abstract_params)


def read_tags(directory: str) -> dict[str, list[float]]:
  from st_moe_jax import summaries
  return {tag: values for tag, (_, values) in summaries.read_scalars(directory).items()}


@pytest.mark.slow
def test_tensorboard_event_files_have_t5x_tags(tmp_path):
  from st_moe_jax import trainer
  model_dir = str(tmp_path / 'run')
  loop = trainer.LoopConfig(4, BATCH, log_period=2, eval_period=4, eval_steps=2, checkpoint_period=100)
  trainer.fit(make_trainer(), model_dir, make_data(), loop, eval_data=lambda: make_data('validation'),
              eval_name=TASK, print_fn=lambda _: None)
  train_tags = read_tags(os.path.join(model_dir, 'train'))
  expected = ['loss', 'cross_ent_loss', 'z_loss', 'accuracy', 'learning_rate', 'timing/steps_per_second',
              'timing/seqs_per_second', 'experts/auxiliary_loss', 'experts/router_z_loss',
              'experts/fraction_tokens_left_behind', 'experts/expert_usage', 'experts/router_confidence']
  for tag in expected:
    assert len(train_tags.get(tag, [])) == 2, (tag, sorted(train_tags))
  np.testing.assert_allclose(train_tags['learning_rate'], [0.01, 0.01], rtol=1e-6)
  eval_tags = read_tags(os.path.join(model_dir, 'training_eval', TASK))
  for tag in ['loss', 'cross_ent_loss', 'accuracy', 'bits_per_byte', 'experts/expert_usage']:
    assert len(eval_tags.get(tag, [])) == 1, (tag, sorted(eval_tags))


def test_evaluate_weights_batches_by_tokens():
  """Two batches, the second all padding: the token-weighted mean equals the first batch's metrics."""
  from st_moe_jax import data, trainer
  tr = make_trainer()
  batch = next(make_data('validation'))
  tr.prepare(batch)
  params = tr.init_params()
  padding = {k: np.zeros_like(v) for k, v in batch.items()}
  one = trainer.evaluate(tr, params, iter([batch]), BATCH)
  two = trainer.evaluate(tr, params, iter([batch, padding]), BATCH)
  for k in ('loss', 'cross_ent_loss', 'accuracy', 'bits_per_byte'):
    np.testing.assert_allclose(one[k], two[k], rtol=1e-6)
  assert one['bits_per_byte'] > 0 and one['target_tokens'] == float(np.sum(batch['decoder_loss_weights']))
  del data


def _fit_tags(model_dir: str, steps: int, log_period: int, schedule=None, lines=None):
  from st_moe_jax import trainer
  loop = trainer.LoopConfig(steps, BATCH, log_period=log_period, eval_period=1000, checkpoint_period=2)
  trainer.fit(make_trainer(schedule), model_dir, make_data(), loop,
              print_fn=(lines.append if lines is not None else lambda _: None))
  return read_tags(os.path.join(model_dir, 'train'))


@pytest.mark.slow
def test_logged_scalars_are_means_over_the_log_period(tmp_path):
  """LOG_PERIOD=2 logs the mean of the two steps' values (t5x), which LOG_PERIOD=1 logs one by one; a
  warm-up makes the learning rate differ from step to step."""
  from st_moe_jax import optim
  schedule = optim.create_learning_rate_scheduler('constant * linear_warmup', 0.01, warmup_steps=10)
  each = _fit_tags(str(tmp_path / 'each'), 4, 1, schedule)
  pairs = _fit_tags(str(tmp_path / 'pairs'), 4, 2, schedule)
  layer_tags = [t for t in each if t.startswith('experts/decoder/layers_')]
  assert len(layer_tags) == 3, sorted(each)
  for tag in ['loss', 'cross_ent_loss', 'accuracy', 'learning_rate', 'experts/expert_usage', *layer_tags]:
    per_step = np.asarray(each[tag])
    assert len(per_step) == 4 and len(pairs[tag]) == 2, tag
    np.testing.assert_allclose(pairs[tag], per_step.reshape(2, 2).mean(axis=1), rtol=1e-5, err_msg=tag)
  assert not np.allclose(each['loss'][0], each['loss'][1])  # the mean is not just one step's value
  np.testing.assert_allclose(pairs['learning_rate'], [(schedule(0) + schedule(1)) / 2,
                                                      (schedule(2) + schedule(3)) / 2], rtol=1e-6)


@pytest.mark.slow
def test_first_log_after_resume_has_steps_per_second(tmp_path):
  """The first step after a resume compiles; logged at once (LOG_PERIOD=1) it used to read 0.00 steps/s."""
  import re
  model_dir, lines = str(tmp_path / 'run'), []
  _fit_tags(model_dir, 2, 1)
  tags = _fit_tags(model_dir, 4, 1, lines=lines)
  steps_per_s = [float(m.group(1)) for m in map(re.compile(r'\| ([0-9.]+) steps/s').search, lines) if m]
  assert len(steps_per_s) == 2 and min(steps_per_s) > 0, lines
  assert len(tags['timing/steps_per_second']) == 4 and min(tags['timing/steps_per_second']) > 0


@pytest.mark.slow
def test_st_moe_tiny_writes_per_layer_expert_metrics(tmp_path, monkeypatch):
  """st_moe_tiny (decoder-only): experts/decoder/layers_1/<metric> in train/ and training_eval/<task>/."""
  from st_moe_jax import data, gin_setup, optim, partitioning, trainer
  import jax
  monkeypatch.chdir(REPO)
  gin_setup.parse_model_gin(['gin/models/st_moe_tiny.gin', 'gin/runs/decoder_only.gin'], search_paths=[REPO])
  tr = trainer.Trainer(gin_setup.architecture(), optim.adafactor, optim.constant_schedule(0.01),
                       partitioning.create_mesh(jax.devices()[:1]), model_kind=data.DECODER_ONLY)
  model_dir = str(tmp_path / 'run')
  loop = trainer.LoopConfig(2, BATCH, log_period=1, eval_period=2, eval_steps=1, checkpoint_period=100)
  trainer.fit(tr, model_dir, make_data(), loop, eval_data=lambda: make_data('validation'), eval_name=TASK,
              print_fn=lambda _: None)
  for folder, points in (('train', 2), (os.path.join('training_eval', TASK), 1)):
    tags = read_tags(os.path.join(model_dir, folder))
    for name in ('expert_usage', 'fraction_tokens_left_behind', 'router_confidence'):
      values = tags.get(f'experts/decoder/layers_1/{name}', [])
      assert len(values) == points, (folder, name, sorted(tags))
      assert all(0.0 <= v <= 1.0 for v in values), (folder, name, values)
    assert not any(t.startswith('layer/') for t in tags)


def test_ratio_standard_error_reduces_to_the_standard_error_of_the_mean():
  """With equal batch sizes, R = mean(y_i / x) and its SE is the sample std of y_i / x over sqrt(n); with
  unequal sizes it weighs batches by their tokens (a big batch far from R counts more)."""
  from st_moe_jax import trainer
  y = np.array([3.0, 5.0, 4.5, 2.0])
  assert trainer.ratio_standard_error(list(zip(y, [2.0] * 4))) == pytest.approx(
      np.std(y / 2.0, ddof=1) / np.sqrt(4))
  light = trainer.ratio_standard_error([(1.0, 1.0), (9.0, 9.0), (5.0, 1.0)])
  heavy = trainer.ratio_standard_error([(1.0, 1.0), (9.0, 9.0), (45.0, 9.0)])
  assert heavy > light > 0


def test_paired_difference_cancels_the_noise_both_models_share():
  """Two models on the same batches: some batches are hard for both (shared noise), b is 0.01 nats a byte
  worse everywhere plus a little noise of its own. The batch-by-batch difference is the difference of the two
  bits/byte, with an SE far below either model's own; batches that differ are refused."""
  from st_moe_jax import trainer
  rng = np.random.default_rng(0)
  byte_tokens = rng.integers(1500, 2048, 64).astype(float)
  hardness = rng.uniform(0.8, 2.0, 64)  # nats per byte, shared
  a = np.stack([hardness * byte_tokens, byte_tokens], 1)
  b = np.stack([(hardness + 0.01 + rng.normal(0, 0.002, 64)) * byte_tokens, byte_tokens], 1)
  delta, se = trainer.paired_difference(b, a)
  bits = lambda x: x[:, 0].sum() / x[:, 1].sum() / np.log(2)
  assert delta == pytest.approx(bits(b) - bits(a))
  assert delta == pytest.approx(0.01 / np.log(2), rel=0.05)
  unpaired = np.hypot(trainer.ratio_standard_error(a), trainer.ratio_standard_error(b)) / np.log(2)
  assert 0 < se < unpaired / 20
  diff = (b[:, 0] - a[:, 0]) / byte_tokens / np.log(2)  # equal-weight check of the scale of the SE
  assert se == pytest.approx(np.std(diff, ddof=1) / 8, rel=0.2)
  with pytest.raises(ValueError, match='same >= 2 batches'):
    trainer.paired_difference(a, b[:-1])
  with pytest.raises(ValueError, match='equal byte counts'):
    trainer.paired_difference(a, b + [0.0, 1.0])


def test_paired_difference_in_blocks_sees_noise_that_neighbouring_batches_share():
  """Batches in file order: 8 'files' of 8 batches, and on each file b is better or worse than a by its own
  amount (shared by the file's batches). Per batch the SE misses that; in blocks of a file it is the spread
  over files, sqrt(8) times larger here. block=1 is the per-batch SE; a short last block is kept."""
  from st_moe_jax import trainer
  rng = np.random.default_rng(1)
  byte_tokens = np.full(64, 2000.0)
  per_file = np.repeat(rng.normal(0, 0.02, 8), 8)  # nats per byte
  a = np.stack([np.full(64, 1.5) * byte_tokens, byte_tokens], 1)
  b = np.stack([(1.5 + per_file + rng.normal(0, 1e-4, 64)) * byte_tokens, byte_tokens], 1)
  delta, batch_se = trainer.paired_difference(b, a)
  assert (delta, batch_se) == trainer.paired_difference(b, a, block=1)
  _, file_se = trainer.paired_difference(b, a, block=8)
  files = per_file[::8] / np.log(2)
  assert delta == pytest.approx(per_file.mean() / np.log(2), abs=1e-4)
  assert file_se == pytest.approx(np.std(files, ddof=1) / np.sqrt(8), rel=0.02)
  assert file_se > 2 * batch_se
  assert trainer.paired_difference(b, a, block=5)[0] == delta  # 12 blocks of 5 and one of 4: every batch counts
  with pytest.raises(ValueError, match='block must be in'):
    trainer.paired_difference(b, a, block=33)
