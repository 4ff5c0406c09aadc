"""Strategy flags: each belongs to one strategy and is refused for another; official aliases are
aliases (a contradiction is an error); configuring never rewrites the driver's flags; a strategy
keeps no state from one sampling call to the next."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoregressive.sample.common import add_sampling_args
from autoregressive.strategies import STRATEGIES, check_strategy_flags, flag_owners, get_strategy, parse_driver_args
from autoregressive.train.train_c2i import build_parser, resolve_flags
from utils.run import ResumeConflict, given_flags, take_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_every_strategy_flag_has_one_owner():
    owners = flag_owners()
    assert owners["ls"] == ("var", "--ls") and owners["patch_level"][0] == "npp"
    assert owners["spe_token_num"][0] == "par" and owners["group_sizes_list"][0] == "lpd"
    for name, cls in STRATEGIES.items():  # a strategy's own flags are never foreign to it
        own = {d for d, (o, _) in owners.items() if o == name}
        check_strategy_flags(name, own)


@pytest.mark.parametrize("strategy, flags, owner", [
    ("raster", ["--ls", "0.3"], "--ls is a flag of --strategy var"),
    ("lpd", ["--spe-token-num", "15"], "--spe-token-num is a flag of --strategy par"),
    ("arpg", ["--patch-level", "3"], "--patch-level is a flag of --strategy npp"),
    ("var", ["--group-sizes-list", "x.json"], "--group-sizes-list is a flag of --strategy lpd"),
])
def test_a_flag_of_another_strategy_is_refused_by_both_drivers(strategy, flags, owner, capsys):
    train = build_parser()
    with pytest.raises(SystemExit) as e:
        parse_driver_args(train, ["--code-path", "c", "--strategy", strategy, *flags])
    assert e.value.code == 2 and owner in capsys.readouterr().err
    sample = argparse.ArgumentParser()
    add_sampling_args(sample)
    with pytest.raises(SystemExit) as e:
        parse_driver_args(sample, ["--gpt-ckpt", "g", "--vq-ckpt", "v", "--strategy", strategy, *flags])
    assert e.value.code == 2 and owner in capsys.readouterr().err
    # an in-process call (no command line) is checked on the values that differ from the defaults
    args = train.parse_args(["--code-path", "c", "--strategy", strategy, *flags])
    with pytest.raises(ValueError, match=owner):
        check_strategy_flags(strategy, given_flags(train, args=args))


def test_the_command_line_refusal_exits_2_with_one_error_line(tmp_path):
    for script, base in (("autoregressive/train/train_c2i.py", ["--code-path", str(tmp_path / "codes"),
                                                                "--results-dir", str(tmp_path / "results")]),
                         ("autoregressive/sample/sample_c2i.py", ["--gpt-ckpt", str(tmp_path / "g.pt"),
                                                                  "--vq-ckpt", str(tmp_path / "v.pt")])):
        res = subprocess.run([sys.executable, script, *base, "--strategy", "raster", "--ls", "0.3"], cwd=ROOT,
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        errors = [line for line in res.stderr.splitlines() if line.startswith(("error:", f"{Path(script).name}: error:"))]
        assert res.returncode == 2 and len(errors) == 1, res.stderr
        assert "--ls is a flag of --strategy var" in errors[0] and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def var_training_args(*flags: str) -> argparse.Namespace:
    parser, argv = build_parser(), ["--code-path", "c", "--strategy", "var", *flags]
    args = parser.parse_args(argv)
    resolve_flags(args, given_flags(parser, argv))
    return args


def test_official_aliases_set_the_driver_flags_and_a_contradiction_is_an_error():
    args = var_training_args("--bs", "768", "--ep", "200", "--tblr", "8e-5", "--fp16", "2", "--twd", "0.05",
                             "--tclip", "2")
    assert (args.global_batch_size, args.epochs, args.mixed_precision, args.weight_decay, args.max_grad_norm) == \
        (768, 200, "bf16", 0.05, 2)
    assert args.lr == pytest.approx(8e-5 * 768 / 256)
    same = var_training_args("--bs", "768", "--global-batch-size", "768")
    assert same.global_batch_size == 768
    with pytest.raises(ValueError, match=r"--bs 768 .*contradicts --global-batch-size 512"):
        var_training_args("--bs", "768", "--global-batch-size", "512")
    with pytest.raises(ValueError, match=r"--tblr .*contradicts --lr"):
        var_training_args("--tblr", "1e-4", "--lr", "3e-4")
    with pytest.raises(ValueError, match=r"--fp16 0 \(= --mixed-precision none\) contradicts --mixed-precision bf16"):
        var_training_args("--fp16", "0", "--mixed-precision", "bf16")
    defaults = var_training_args()  # no alias given: the driver's flags stay as they are
    assert (defaults.global_batch_size, defaults.lr, defaults.mixed_precision) == (256, 1e-4, "bf16")


def test_configure_never_changes_the_flags():
    for name in STRATEGIES:
        parser, argv = build_parser(), ["--code-path", "c", "--strategy", name]
        if name == "var":
            argv += ["--pn", "1_2_4", "--image-size", "64", "--downsample-size", "16"]
        args = parser.parse_args(argv)
        before = dict(vars(args))
        get_strategy(name).configure(args, training=True)
        assert vars(args) == before, name
        sargs = argparse.ArgumentParser()
        add_sampling_args(sargs)
        s = sargs.parse_args(["--gpt-ckpt", "g", "--vq-ckpt", "v", "--strategy", name, "--image-size", "256",
                              *(["--pn", "1_2_4_8_16"] if name == "var" else [])])
        before = dict(vars(s))
        get_strategy(name).configure(s, training=False)
        assert vars(s) == before, name


def test_the_resume_rule_takes_recorded_values_and_names_both_in_a_conflict():
    args = argparse.Namespace(gpt_model="GPT-B", image_size=256, vocab_size=16384)
    taken = take_from_checkpoint(args, {"gpt_model": "GPT-L", "image_size": 256}, ("gpt_model", "image_size"),
                                 given=set(), what="the checkpoint")
    assert taken == {"gpt_model": "GPT-L"} and args.gpt_model == "GPT-L"
    take_from_checkpoint(args, {"gpt_model": "GPT-L"}, ("gpt_model",), given={"gpt_model"}, what="the checkpoint")
    args.gpt_model = "GPT-XL"
    with pytest.raises(ResumeConflict, match="--gpt-model 'GPT-XL' contradicts the checkpoint, which was trained "
                                             "with --gpt-model 'GPT-L'"):
        take_from_checkpoint(args, {"gpt_model": "GPT-L"}, ("gpt_model",), given={"gpt_model"}, what="the checkpoint")


def test_lpd_strategy_keeps_its_label_dropout_from_the_flags_not_from_build_model():
    s = get_strategy("lpd")
    args = build_parser().parse_args(["--code-path", "c", "--strategy", "lpd", "--class-dropout-prob", "0.25"])
    s.configure(args, training=True)
    before = dict(vars(s))
    s.build_model("LPD-debug", block_size=16, vocab_size=32, num_classes=4, class_dropout_prob=0.5)
    assert vars(s) == before  # building a model changes nothing on the strategy
    assert s.label_drop_prob == 0.25


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_sampling_leaves_no_state_on_the_strategy(name):
    """Two sampling calls and a decode leave the strategy's attributes as they were (the runner
    aside, which a driver sets): what decoding needs travels in the returned `Generation`."""
    from tests.test_fast_decode import fixture_model

    strategy, model, num_classes = fixture_model(name)
    labels = torch.arange(3) % num_classes
    before = {k: v for k, v in vars(strategy).items() if k != "_runner"}
    kinds = [{}, {"more_smooth": True}] if name == "var" else [{}]
    for seed, extra in enumerate(kinds * 2):
        gen = strategy.generate_for_decoding(model, labels, cfg_scale=2.0, temperature=1.0,
                                             generator=torch.Generator().manual_seed(seed), **extra)
        assert (gen.latent is not None) == bool(extra)
    after = {k: v for k, v in vars(strategy).items() if k != "_runner"}
    assert after.keys() == before.keys()
    for k in before:
        assert after[k] is before[k] or after[k] == before[k], k


def test_can_edit_says_which_strategies_implement_edit():
    from autoregressive.strategies.base import Strategy

    for name, cls in STRATEGIES.items():
        assert cls.can_edit == (cls.edit is not Strategy.edit), name
