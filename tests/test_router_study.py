"""scripts/router_study.py: the table's statistics, resuming a study killed mid-run, and refusing to mix
configurations in one results file. Real runs (trainer.fit, orbax checkpoints, event files) of the 'quick'
preset; one study is shared by the tests."""

import dataclasses
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = ['scripts/router_study.py', '--preset', 'quick', '--routers', 'dense,st_moe_top2', '--seeds', '0,1',
         '--timing_rounds', '1', '--timing_steps', '1']

# One xdist worker runs them all, so that the module fixture's runs happen once (run_tests.sh: --dist loadgroup).
pytestmark = pytest.mark.xdist_group('router_study')


def import_router_study():
  """scripts/router_study.py as a module (it is a script, not part of the package)."""
  if os.path.join(REPO, 'scripts') not in sys.path:
    sys.path.insert(0, os.path.join(REPO, 'scripts'))
  return importlib.import_module('router_study')


def run_study(out_dir, *extra, check=True) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device, as a user runs it
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  result = subprocess.run([sys.executable, *STUDY, '--out_dir', str(out_dir), *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
  if check:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp('study')
  result = run_study(out_dir)
  return out_dir, result, json.loads((out_dir / 'router_study.json').read_text())


@pytest.mark.slow
def test_table_reports_seed_statistics_from_the_runs(study):
  out_dir, result, report = study
  runs = report['runs']
  assert sorted(runs) == ['dense/seed0', 'dense/seed1', 'st_moe_top2/seed0', 'st_moe_top2/seed1']
  dense = [runs[f'dense/seed{s}']['val_bits_per_byte'] for s in (0, 1)]
  moe = [runs[f'st_moe_top2/seed{s}']['val_bits_per_byte'] for s in (0, 1)]
  assert dense[0] != dense[1]  # seeds change the initialisation and the data order
  rows = {r['router']: r for r in report['summary']}
  assert rows['dense']['mean'] == pytest.approx(np.mean(dense))
  assert rows['dense']['std'] == pytest.approx(np.std(dense, ddof=1))
  assert rows['st_moe_top2']['delta'] == pytest.approx(np.mean(moe) - np.mean(dense))
  assert rows['st_moe_top2']['delta_se'] == pytest.approx(
      math.sqrt(np.var(dense, ddof=1) / 2 + np.var(moe, ddof=1) / 2))
  pairs = np.subtract(moe, dense)  # same seed, same data order
  assert rows['st_moe_top2']['paired_delta'] == pytest.approx(pairs.mean())
  assert rows['st_moe_top2']['paired_se'] == pytest.approx(np.std(pairs, ddof=1) / math.sqrt(2))
  # Each seed's final evaluations compared batch by batch: the same batches, so the difference is exact.
  seed_deltas = rows['st_moe_top2']['seed_deltas']
  assert [s for s, _, _ in seed_deltas] == [0, 1]
  for (_, delta, se), pair in zip(seed_deltas, pairs):
    assert delta == pytest.approx(pair, abs=1e-9) and se > 0
    assert f'{delta:+.4f} ({delta / se:+.1f})' in result.stdout
  table = [line for line in result.stdout.splitlines() if line.startswith('| ')]
  assert table[1].startswith('| dense (') and f'{np.mean(dense):.4f} ± {np.std(dense, ddof=1):.4f}' in table[1]
  assert table[2].startswith('| st_moe_top2 (') and ' SE, unpaired ' in table[2] and '(2 seeds; ' in table[2]
  # Each run's curve is the during-training validation read back from its TensorBoard event files.
  for run in runs.values():
    assert [s for s, _ in run['curve']] == [4, 8]
    assert run['val_bits_per_byte_se'] > 0 and run['val_bytes'] > 0
  assert runs['st_moe_top2/seed0']['dropped_train'] is not None
  assert set(report['timing']['step_seconds']) == {'dense', 'st_moe_top2'}
  assert rows['st_moe_top2']['equal_time_step'] <= 8
  for name in ('router_study.md', 'router_study_validation.png', 'router_study_moe_metrics.png'):
    assert (out_dir / name).stat().st_size > 1000, name
  # The training gap: the MoE's logged training cross-entropy minus dense's at the same seed, binned by eval_every.
  from st_moe_jax import summaries  # pylint: disable=g-import-not-at-top
  last_bins = []
  for seed in (0, 1):
    moe_ce, dense_ce = (summaries.read_scalars(str(out_dir / 'runs' / f'{r}-seed{seed}' / 'train'))['cross_ent_loss']
                        for r in ('st_moe_top2', 'dense'))
    assert moe_ce[0] == dense_ce[0] == list(range(1, 9))  # logged every step
    gap = np.subtract(moe_ce[1], dense_ce[1])
    bins = report['training_gaps']['st_moe_top2'][str(seed)]
    assert [end for end, _ in bins] == [4, 8]
    assert [value for _, value in bins] == pytest.approx([gap[:4].mean(), gap[4:].mean()])
    assert f'| st_moe_top2 | {seed} | {gap[:4].mean():+.4f} | {gap[4:].mean():+.4f} |' in \
        (out_dir / 'router_study.md').read_text()
    last_bins.append(gap[4:].mean())
  # Over seeds, each bin's mean and its standard error (the seeds' spread).
  assert ('| st_moe_top2 | mean ± SE (2 seeds) | ' in (out_dir / 'router_study.md').read_text() and
          f'| {np.mean(last_bins):+.4f} ± {np.std(last_bins, ddof=1) / math.sqrt(2):.4f} |' in
          (out_dir / 'router_study.md').read_text())
  assert report['training_gaps_over_seeds']['st_moe_top2'][-1] == pytest.approx(
      [8, np.mean(last_bins), np.std(last_bins, ddof=1) / math.sqrt(2), 2])


@pytest.mark.slow
def test_a_study_killed_mid_run_continues_where_it_stopped(study, tmp_path):
  """The state a kill between steps 4 and 8 of the last run leaves: its checkpoint_4 and no result. The
  rerun keeps the finished runs, resumes that run from step 4, and ends where the uninterrupted study did."""
  out_dir, _, report = study
  killed = tmp_path / 'killed'
  shutil.copytree(out_dir, killed)
  run_dir = killed / 'runs' / 'st_moe_top2-seed1'
  shutil.rmtree(run_dir / 'checkpoint_8')
  results = json.loads((killed / 'results.json').read_text())
  del results['runs']['st_moe_top2/seed1']
  (killed / 'results.json').write_text(json.dumps(results))
  with open(killed / 'router_study.md', 'a') as f:
    f.write('\n## Findings\n\nWritten by hand.\n')
  result = run_study(killed)
  assert '1 runs to do (3 done)' in result.stderr
  assert (killed / 'router_study.md').read_text().endswith('## Findings\n\nWritten by hand.\n')
  assert 'resum' in result.stderr.lower() and 'checkpoint_4' in result.stderr
  resumed = json.loads((killed / 'results.json').read_text())['runs']['st_moe_top2/seed1']
  original = report['runs']['st_moe_top2/seed1']
  assert resumed['val_bits_per_byte'] == original['val_bits_per_byte']
  assert resumed['curve'] == original['curve']


@pytest.mark.slow
def test_refuses_to_mix_configurations_in_one_file(study):
  out_dir, _, _ = study
  before = (out_dir / 'results.json').read_text()
  result = run_study(out_dir, '--steps', '9', check=False)
  assert result.returncode != 0
  assert 'steps: 8 there, 9 here' in result.stderr and '--out_dir' in result.stderr
  assert (out_dir / 'results.json').read_text() == before


def test_unknown_router_is_refused():
  result = subprocess.run([sys.executable, 'scripts/router_study.py', '--routers', 'dense,top3'], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "unknown --routers ['top3']" in result.stderr
  result = subprocess.run([sys.executable, 'scripts/router_study.py', '--steps', '50', '--warmup_steps', '100'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and 'total_steps > warmup_steps, got 50 <= 100' in result.stderr
  result = subprocess.run([sys.executable, 'scripts/router_study.py', '--expert_learning_rate_scale_end', '-1'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and '--expert_learning_rate_scale_end must be >= 0' in result.stderr


def test_only_the_moe_models_train_their_experts_at_the_scaled_rate():
  import jax
  router_study = import_router_study()
  from st_moe_jax import optim, partitioning
  c = router_study.PRESETS['quick']
  mesh = partitioning.create_mesh(jax.devices()[:1])
  scales = lambda router: router_study.make_trainer(router, c, 0, mesh).make_optimizer.keywords[
      'learning_rate_scales']
  assert set(scales('st_moe_top2')) == {optim.EXPERT_PARAM_PATTERN}
  assert scales('dense') is None  # a dense model has no expert to match: scale_by_path would refuse it
  moe = router_study.build_model('st_moe_top2', c).moe
  # The learning rate decays to zero at the last step (its floor, 1e-8), from the schedule's peak.
  schedule = router_study.make_trainer('dense', c, 0, mesh).learning_rate
  assert c.learning_rate_factors == 'rsqrt_decay * linear_decay'
  assert float(schedule(c.steps)) == pytest.approx(1e-8)
  assert float(schedule(c.warmup_steps)) == pytest.approx(c.learning_rate / math.sqrt(c.warmup_steps))
  assert moe.group_multiple == c.routing_groups == 1 and moe.group_size == c.batch * c.length
  # The presets' experts' factor moves linearly over the run, 0.3× → 1× (round 6); without an end it is constant.
  assert (c.expert_learning_rate_scale, c.expert_learning_rate_scale_end) == (0.3, 1.0)
  factor = scales('st_moe_top2')[optim.EXPERT_PARAM_PATTERN]
  assert [float(factor(s)) for s in (0, c.steps // 2, c.steps)] == pytest.approx([0.3, 0.65, 1.0])
  assert router_study.expert_scale_text(c) == '0.3× rising linearly to 1.0× by the last step of'
  constant = dataclasses.replace(c, expert_learning_rate_scale_end=None)
  assert router_study.make_trainer('st_moe_top2', constant, 0, mesh).make_optimizer.keywords[
      'learning_rate_scales'] == {optim.EXPERT_PARAM_PATTERN: 0.3}
  assert router_study.expert_scale_text(constant) == '0.3×'


def test_verdict_is_the_same_seed_difference_against_its_seed_and_evaluation_noise():
  """The table from a results file (no training): 'beyond noise?' judges the same-seed difference, whose SE
  adds the spread over seeds and the evaluation noise of the mean difference (the same batches for every
  seed); a router at one seed shows its difference from dense at that seed."""
  router_study = import_router_study()
  # dense varies a lot between seeds; st_moe_top2 is about 0.01 better at every seed: the paired z is large,
  # the unpaired z small. switch_top1 runs at seed 1 only.
  values = {'dense': {0: 2.0, 1: 2.2, 2: 1.9}, 'st_moe_top2': {0: 1.99, 1: 2.19, 2: 1.891},
            'switch_top1': {1: 2.25}}

  def table(runs):
    results = {'config': dataclasses.asdict(router_study.PRESETS['quick']), 'runs': runs, 'timing': None}
    rows = {r['router']: r for r in router_study.summarize(results)}
    lines = {line.split(' (')[0][2:]: line for line in router_study.markdown_table(list(rows.values())).splitlines()
             if line.startswith('| ') and not line.startswith('| router')}
    return rows, lines

  runs = {f'{router}/seed{seed}': {'router': router, 'seed': seed, 'val_bits_per_byte': v,
                                   'val_bits_per_byte_se': 0.03, 'params': 1_000_000, 'dropped_train': None,
                                   'dropped_eval': None, 'curve': []}
          for router, by_seed in values.items() for seed, v in by_seed.items()}
  rows, lines = table(runs)
  pairs = np.array([-0.01, -0.01, -0.009])
  paired_se = pairs.std(ddof=1) / math.sqrt(3)
  assert rows['st_moe_top2']['paired_delta'] == pytest.approx(pairs.mean())
  assert rows['st_moe_top2']['paired_se'] == pytest.approx(paired_se)
  assert rows['st_moe_top2']['paired_eval_se'] == 0.0  # no batches recorded
  assert rows['switch_top1']['paired_delta'] == pytest.approx(0.05) and 'paired_se' not in rows['switch_top1']
  unpaired_z = abs(rows['st_moe_top2']['delta']) / rows['st_moe_top2']['delta_se']
  paired_z = abs(pairs.mean()) / paired_se
  assert unpaired_z < 3 < paired_z
  assert f'| yes, better (paired {paired_z:.1f} SE, unpaired {unpaired_z:.1f}) |' in lines['st_moe_top2']
  assert '| +0.0500 (seed 1) |' in lines['switch_top1'] and 'n/a (one seed)' in lines['switch_top1']

  # Now each run records 64 evaluation batches of 1000 bytes. The MoE's difference from dense moves by ±a
  # from one block of 16 batches to the next, the same way at every seed (it is which batches were read):
  # the mean difference's evaluation SE is a/√3 (4 blocks, ratio estimator), and it decides the verdict.
  a, nats = 0.01, math.log(2) * 1000
  noise = np.repeat([a, -a, a, -a], 16)
  for run in runs.values():
    moe = run['router'] != 'dense'
    bits = run['val_bits_per_byte'] + (noise if moe else 0.0)
    run['val_batches'] = [[b * nats, 1000.0] for b in np.broadcast_to(bits, (64,))]
  rows, lines = table(runs)
  assert rows['st_moe_top2']['paired_eval_se'] == pytest.approx(a / math.sqrt(3))
  total = math.hypot(paired_se, a / math.sqrt(3))
  assert rows['st_moe_top2']['paired_total_se'] == pytest.approx(total)
  assert abs(pairs.mean()) / total < 3
  assert f'| no (paired {abs(pairs.mean()) / total:.1f} SE, unpaired {unpaired_z:.1f}) |' in lines['st_moe_top2']
  assert [round(d, 6) for _, d, _ in rows['st_moe_top2']['seed_deltas']] == [round(p, 6) for p in pairs]


def test_sittings_side_by_side_add_to_one_results_file_without_losing_anything(tmp_path):
  # Two sittings of one study (say, one per router) add to the same results.json at once: each addition must
  # survive (a read-modify-write without a lock loses the other's), and no write may trip on the other's
  # temporary file.
  path = tmp_path / 'results.json'
  go = tmp_path / 'go'
  writer = ('import os, sys, time; sys.path.insert(0, "scripts"); import router_study\n'
            'config = router_study.parse_args([]).config\n'
            'open(sys.argv[3] + sys.argv[2], "w").close()\n'
            'while not os.path.exists(sys.argv[3]): time.sleep(0.01)\n'
            'for i in range(300):\n'
            '  router_study.update_results(sys.argv[1], config,\n'
            '                              lambda r: r["commands"].append(f"{sys.argv[2]}{i}"))\n')
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'}
  writers = [subprocess.Popen([sys.executable, '-c', writer, str(path), name, str(go)], cwd=REPO, env=env,
                              stderr=subprocess.PIPE, text=True) for name in ('a', 'b')]
  while not all((tmp_path / f'go{name}').exists() for name in ('a', 'b')):  # both imported
    assert all(w.poll() is None for w in writers), [w.stderr.read()[-2000:] for w in writers]
    time.sleep(0.05)
  go.touch()  # ...then both write at once
  for w in writers:
    assert w.wait(timeout=300) == 0, w.stderr.read()[-2000:]
  commands = json.loads(path.read_text())['commands']
  assert sorted(commands) == sorted(f'{name}{i}' for name in ('a', 'b') for i in range(300))
  assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


def test_results_from_the_older_data_streams_are_refused_but_can_be_reported(tmp_path):
  """A results file from before `training_data` and `validation_data` were recorded was made with the
  64-files-at-a-time training stream and validation in file order: a study with today's code refuses to add
  to it, naming the fields; a report reads it as it is."""
  router_study = import_router_study()
  config = router_study.PRESETS['quick']
  legacy = dataclasses.asdict(config)
  del legacy['training_data'], legacy['validation_data']
  path = tmp_path / 'results.json'
  path.write_text(json.dumps({'config': legacy, 'runs': {}, 'timing': None, 'commands': []}))
  with pytest.raises(SystemExit) as refused:
    router_study.load_results(str(path), config)
  for record, legacy_value in router_study.RECORDS.items():
    assert f'{record}: {legacy_value} there, {getattr(config, record)} here' in str(refused.value)
  assert router_study.load_results(str(path), None)['config'] == {**legacy, **router_study.RECORDS}
  with pytest.raises(SystemExit, match='no results at'):
    router_study.load_results(str(tmp_path / 'none.json'), None)
  # A setting added later (expert_learning_rate_scale_end): older files had its default (None, constant), so
  # they match a constant study and are refused, by name, by the presets' rising one.
  constant = dataclasses.replace(config, expert_learning_rate_scale_end=None)
  older = dataclasses.asdict(constant)
  del older['expert_learning_rate_scale_end']
  path.write_text(json.dumps({'config': older, 'runs': {}, 'timing': None, 'commands': []}))
  assert router_study.load_results(str(path), constant)['config'] == dataclasses.asdict(constant)
  with pytest.raises(SystemExit, match='expert_learning_rate_scale_end: None there, 1.0 here'):
    router_study.load_results(str(path), config)


def test_every_run_is_evaluated_on_the_same_shuffled_sample_of_the_whole_validation_split():
  """Every evaluation reads the split's segments in one fixed shuffled order, whatever the run's seed and
  however often the process has evaluated before: two reads give the same batches, and they are not the
  file-order batches. (That a shuffled epoch holds every segment once: tests/test_tasks_pretraining.py.)"""
  router_study = import_router_study()
  from st_moe_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  c = router_study.PRESETS['quick']

  def first_batches(batches, n=8):
    batches = iter(batches)
    return np.stack([next(batches)['decoder_target_tokens'] for _ in range(n)])

  first = first_batches(router_study.validation_batches(c))
  assert np.array_equal(first, first_batches(router_study.validation_batches(c)))
  # A shuffled tf.data dataset read a second time is reshuffled: why validation_batches builds it afresh.
  reused = router_study.dataset(c, 'validation', router_study.VALIDATION_SEED)
  assert np.array_equal(first, first_batches(data_lib.DataIterator(reused)))
  assert not np.array_equal(first, first_batches(data_lib.DataIterator(reused)))
  cfg = data_lib.DatasetConfig('stdlib_lm', {'targets': c.length}, split='validation', batch_size=c.batch,
                               shuffle=False, pack=True, num_epochs=1)
  in_file_order = first_batches(data_lib.DataIterator(data_lib.get_dataset(cfg, data_lib.DECODER_ONLY,
                                                                           report_trimming=False)))
  assert first.shape == in_file_order.shape and not np.array_equal(first, in_file_order)
