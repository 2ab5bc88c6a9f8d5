"""Config: YAML + dotted overrides, validated, with errors that name the key."""

from pathlib import Path

import pytest

from dpo.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(name):
    cfg = load_config(str(ROOT / "configs" / name))
    assert cfg.run.name


def test_overrides_are_yaml_scalars_and_lists():
    cfg = load_config(None, ["train.num_workers=4", "data.train_files=[a.jsonl,b.parquet]", "train.use_gpu=true",
                             "train.learning_rate=1e-6", "model.reference=null", "run.name=x=y"])
    assert cfg.train.num_workers == 4 and cfg.train.use_gpu is True and cfg.train.learning_rate == 1e-6
    assert cfg.data.train_files == ["a.jsonl", "b.parquet"] and cfg.model.reference is None
    assert cfg.run.name == "x=y"


@pytest.mark.parametrize("overrides, message", [
    (["train.bogus=1"], "unknown config key 'train.bogus'; known keys in train:"),
    (["bogus.key=1"], "unknown config key 'bogus'"),
    (["train.num_workers=0"], "config key 'train.num_workers': input should be greater than or equal to 1"),
    (["train.beta=abc"], "config key 'train.beta': input should be a valid number"),
    (["data.max_prompt_length=600"], "data.max_prompt_length (600) must be smaller than data.max_length (512)"),
    (["train.loss_type=sigmod"], "train.loss_type: unknown loss type 'sigmod'; valid loss types are:"),
    (["train.loss_type=[sigmoid,sft]", "train.loss_weights=[1]"], "train.loss_weights has 1 entries"),
    (["train.alpha=0.3"], "train.alpha is now train.divergence_alpha (the α of loss_type alpha_divergence)"),
    (["train.num_workers"], "is not key=value"),
    (["train.num_workers.x=1"], "config key 'train.num_workers': input should be a valid integer"),
    # The knob train.report_to replaced: an old config is told what to write instead.
    (["train.tensorboard=true"], "train.tensorboard is gone: list the trackers in train.report_to instead, "
                                 "e.g. train.report_to: [tensorboard]"),
    (["model.lora.rank=8"], "unknown config key 'model.lora.rank'; known keys in model.lora: alpha, dropout, "
                            "enabled, r, target_modules"),
    (["model.lora.r=0"], "config key 'model.lora.r': input should be greater than 0"),
    (["train.layout=shared"], "config key 'train.layout': input should be 'auto', 'padded', 'packed' or "
                              "'shared_prompt' (got 'shared')"),
    (["train.report_to=[wandb,comet]"], "config key 'train.report_to.1': input should be 'tensorboard', 'wandb' "
                                        "or 'mlflow' (got 'comet')"),
    (["train.global_batch_size=0"], "config key 'train.global_batch_size': input should be greater than or equal to 1"),
    # With train.global_batch_size the micro-batches per worker follow from the world size: grad_accum contradicts.
    (["train.global_batch_size=16", "train.grad_accum=2"], "train.global_batch_size=16 and train.grad_accum=2 both "
                                                           "set the micro-batches of a step"),
    (["train.global_batch_size=9", "train.batch_size=8", "train.num_workers=3"],
     "train.global_batch_size=9 makes 2 micro-batches of up to train.batch_size=8 pairs a step, fewer than "
     "train.num_workers=3, so a worker would train on nothing"),
    # An elastic group, train.num_workers: [min, max].
    (["train.num_workers=[2,1]"], "train.num_workers=[2, 1] is not an elastic range [min, max] of whole numbers with "
                                  "1 <= min <= max"),
    (["train.num_workers=[0,2]"], "train.num_workers=[0, 2] is not an elastic range [min, max]"),
    (["train.num_workers=[1,2,3]"], "train.num_workers=[1, 2, 3] is not an elastic range [min, max]"),
    (["train.num_workers=two"], "config key 'train.num_workers': input should be a valid integer, or a list "
                                "[min, max] of them (got 'two')"),
    (["train.num_workers=[1,2]", "train.max_failures=0"],
     "train.max_failures=0 ends an elastic run (train.num_workers=[1, 2]) at its first lost node"),
    (["train.num_workers=[1,2]", "train.placement_strategy=STRICT_SPREAD"],
     "train.placement_strategy=STRICT_SPREAD with train.num_workers=[1, 2]: Ray Train sizes an elastic group by "
     "what all its nodes hold together"),
    (["train.num_workers=[1,2]", "train.placement_strategy=STRICT_PACK"],
     "train.placement_strategy=STRICT_PACK with train.num_workers=[1, 2]"),
    # 8 pairs in micro-batches of up to 3 are 3 (3, 3, 2): a group of 4 would leave one worker only a stand-in.
    (["train.num_workers=[2,4]", "train.global_batch_size=8", "train.batch_size=3"],
     "train.global_batch_size=8 makes 3 micro-batches of up to train.batch_size=3 pairs a step, fewer than the 4 "
     "workers of train.num_workers=[2, 4] at its largest, so a worker would train on nothing"),
])
def test_mistakes_name_the_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_an_elastic_group_is_sized_by_its_range_and_every_size_gets_micro_batches():
    from dpo.batching import rank_micro_batches

    fixed = load_config(None, ["train.num_workers=3", "train.batch_size=4", "train.grad_accum=2"]).train
    assert (fixed.elastic, fixed.min_workers, fixed.max_workers, fixed.global_batch) == (False, 3, 3, 24)
    # Unset, the global batch is that of the largest group, 4 pairs x 3 workers x 2: the step it keeps at any size.
    t = load_config(None, ["train.num_workers=[1,3]", "train.batch_size=4", "train.grad_accum=2"]).train
    assert (t.elastic, t.min_workers, t.max_workers, t.global_batch) == (True, 1, 3, 24)
    # 9 pairs in micro-batches of up to 4 are 3 (4, 4, 1): the least that gives each of 3 workers one.
    t = load_config(None, ["train.num_workers=[1,3]", "train.batch_size=4", "train.global_batch_size=9"]).train
    assert t.global_batch == 9
    for world in range(t.min_workers, t.max_workers + 1):
        shares = [rank_micro_batches(range(9), t.batch_size, rank, world) for rank in range(world)]
        assert all(any(share.counted for share in rank_shares) for rank_shares in shares), world
        assert sorted(len(share.rows) for rank_shares in shares for share in rank_shares if share.counted) == [1, 4, 4]


def test_the_worker_group_ray_train_gets_is_the_configs():
    """Ray Train's ScalingConfig carries the config's group: (1, 3) is Ray's elastic range, and it looks for room
    to grow every train.elastic_resize_interval_s (7 here, not Ray's 60 or ours); a plain 2 stays fixed."""
    from dpo.launch import scaling_config

    elastic = scaling_config(load_config(None, ["train.num_workers=[1,3]", "train.elastic_resize_interval_s=7",
                                                "train.cpus_per_worker=2", "train.placement_strategy=SPREAD"]))
    assert (elastic.num_workers, elastic.elastic_resize_monitor_interval_s) == ((1, 3), 7)
    assert (elastic.use_gpu, elastic.resources_per_worker, elastic.placement_strategy) == (False, {"CPU": 2}, "SPREAD")
    fixed = scaling_config(load_config(None, ["train.num_workers=2"]))
    assert fixed.num_workers == 2 and fixed.resources_per_worker == {"CPU": 1}


def test_an_elastic_group_needs_the_cpus_of_its_smallest_size(ray_session):
    from dpo.errors import UserError
    from dpo.launch import refuse_unless_training_fits

    # The suite's Ray has 2 CPUs: a group of 1 to 4 workers of 2 CPUs starts with 1 (4 would need 8).
    refuse_unless_training_fits(load_config(None, ["train.num_workers=[1,4]", "train.cpus_per_worker=2"]))
    with pytest.raises(UserError) as err:
        refuse_unless_training_fits(load_config(None, ["train.num_workers=[2,4]", "train.cpus_per_worker=2"]))
    assert str(err.value).startswith("the training workers (train.num_workers=[2, 4]'s smallest group of 2, x "
                                     "train.cpus_per_worker=2) need 4 CPUs, but this job can use 2 of the cluster's 2")


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass --config"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("run: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):  # safe_load refuses Python tags
        load_config(str(unsafe))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(str(ROOT / "configs" / "production.yaml"), ["train.num_workers=3"])
    cfg.save(str(tmp_path / "config.yaml"))
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_every_loss_option_is_a_train_key_that_reaches_the_loss():
    """train.discopop_tau goes through the workers' loss call. The example of tests/test_losses.py (policy
    -2/-4, reference -3/-3.5, β = 0.1) gives x = β·h = 0.15; τ = 0.15 makes m = σ(x/τ) = σ(1) = 0.731059 and
    L = (1 - m)·(-logσ(0.15)) + m·e^-0.15 = 0.268941·0.620957 + 0.731059·0.860708 = 0.796229
    (0.849338 at the default τ = 0.05)."""
    from types import SimpleNamespace

    import torch

    from dpo.loss_options import LOSS_OPTION_NAMES
    from dpo.train_loop import micro_batch_losses

    mb = SimpleNamespace(ref_chosen=torch.tensor([-3.0]), ref_rejected=torch.tensor([-3.5]),
                         chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([2]))
    policy = torch.tensor([-2.0]), torch.tensor([-4.0])
    losses = {}
    for tau in (None, 0.15):
        cfg = load_config(None, ["train.loss_type=discopop"] + ([f"train.discopop_tau={tau}"] if tau else []))
        assert set(LOSS_OPTION_NAMES) <= set(cfg.train.model_dump())
        losses[tau] = micro_batch_losses(cfg.train, *policy, mb).losses.item()
    assert losses[None] == pytest.approx(0.849338, abs=2e-6)
    assert losses[0.15] == pytest.approx(0.796229, abs=2e-6)


@pytest.mark.parametrize("overrides, message", [
    (["train.loss_type=[]"], "train.loss_type is an empty list; give at least one of: sigmoid,"),
    (["train.loss_weights=[1,2]"], "train.loss_weights has 2 entries but loss_type names 1 loss(es) (sigmoid)"),
    (["train.loss_type=discopop", "train.discopop_tau=0"], "train.discopop_tau must be a positive number"),
    (["train.loss_type=alpha_divergence", "train.divergence_alpha=2"],
     "train.divergence_alpha (of alpha_divergence) must lie in"),
    # beta's and label_smoothing's ranges are checked in dpo.losses alone, as the other loss keys are.
    (["train.beta=-1"], "train.beta must be a positive number, got -1.0"),
    (["train.label_smoothing=0.5"], "train.label_smoothing must lie in [0, 0.5), got 0.5"),
    (["train.loss_type=exo_pair"], "train.loss_type exo_pair needs label_smoothing > 0"),
])
def test_loss_mistakes_name_their_train_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(message)


def test_on_and_off_switches_survive_yaml_booleans(tmp_path):
    """YAML 1.1 reads a bare off as False: in an override and in a file, train.response_logits=off is still "off"."""
    assert load_config(None, ["train.response_logits=off"]).train.response_logits == "off"
    (tmp_path / "c.yaml").write_text("train:\n  response_logits: off\n")
    assert load_config(str(tmp_path / "c.yaml")).train.response_logits == "off"
    with pytest.raises(ConfigError, match="train.response_logits"):
        load_config(None, ["train.response_logits=on"])


SWITCHES_AS_LAYOUT = ("(either unset is auto): packing=on is layout=packed; prefix_sharing=on is shared_prompt; both "
                      "off is padded; both auto is auto; packing=auto with prefix_sharing=off is auto under flash "
                      "attention, else padded; packing=off with prefix_sharing=auto is padded under flash attention, "
                      "else auto")


@pytest.mark.parametrize("override, message", [
    ("train.packing=on", f"train.packing is now train.layout, which replaced it and train.prefix_sharing "
                         f"{SWITCHES_AS_LAYOUT}"),
    ("train.prefix_sharing=off", f"train.prefix_sharing is now train.layout, which replaced it and train.packing "
                                 f"{SWITCHES_AS_LAYOUT}")])
def test_the_two_layout_switches_are_told_train_layout_and_how_their_values_map_to_it(override, message):
    """train.layout replaced train.packing and train.prefix_sharing: an old config that sets either is told, in
    one line, the layout each setting of the two chose."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def layout_of_switches(packing, prefix_sharing, attention, device, packs):
    """How dpo.runtime chose the layout from train.packing and train.prefix_sharing before train.layout."""
    if packing == "on" or (packing == "auto" and attention.startswith("flash") and packs()):
        return "packed"
    if prefix_sharing == "on" or (prefix_sharing == "auto" and device.type == "cpu"
                                  and attention in ("eager", "sdpa")):
        return "shared_prompt"
    return "padded"


@pytest.mark.parametrize("attn_implementation", [None, "eager", "sdpa", "flash_attention_2", "flex_attention"])
def test_the_layout_the_two_switches_amount_to_lays_batches_out_as_they_did(attn_implementation):
    """Every setting of train.packing and train.prefix_sharing that was allowed (not both on; prefix sharing
    not under flash attention), on CPU and GPU, with a model that honours packed position ids and one that does
    not: the train.layout that dpo.config.layout_of_retired_switches (and the retired keys' message) gives for it
    resolves to the layout they chose."""
    import torch

    from dpo.config import layout_of_retired_switches
    from dpo.runtime import choose_layout

    attention = attn_implementation or "sdpa"  # transformers' own choice when none is set
    for packing in ("auto", "on", "off"):
        for prefix_sharing in ("auto", "on", "off"):
            if prefix_sharing == "on" and (packing == "on" or attention.startswith("flash")):
                continue
            layout = layout_of_retired_switches(packing, prefix_sharing, attn_implementation)
            for device in (torch.device("cpu"), torch.device("cuda")):
                for honoured in (True, False):
                    packs = lambda: honoured  # noqa: E731
                    assert (choose_layout(layout, attention, device, packs)
                            == layout_of_switches(packing, prefix_sharing, attention, device, packs)), (
                        packing, prefix_sharing, attention, device, honoured, layout)
