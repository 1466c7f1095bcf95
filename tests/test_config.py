"""Config: reference files load unchanged, BASE merging, overrides, errors and derived values."""
import argparse

import pytest

import config as cfg_lib
from config import ConfigError, load_config


def write(path, text):
    path.write_text(text)
    return str(path)


def test_reference_style_file_loads(tmp_path):
    path = write(tmp_path / "swin.yaml", """
DATA:
  IMG_SIZE: 384
MODEL:
  TYPE: swin
  NAME: swin_base_patch4_window12_384_finetune
  DROP_PATH_RATE: 0.5
  SWIN:
    EMBED_DIM: 128
    DEPTHS: [ 2, 2, 18, 2 ]
    NUM_HEADS: [ 4, 8, 16, 32 ]
    WINDOW_SIZE: 12
TRAIN:
  EPOCHS: 30
  WEIGHT_DECAY: 1e-8
  BASE_LR: 2e-05
TEST:
  CROP: False
""")
    config = load_config(path)
    assert config.MODEL.SWIN.DEPTHS == [2, 2, 18, 2]
    assert config.TRAIN.WEIGHT_DECAY == 1e-8
    assert config.TEST.CROP is False
    assert config.is_frozen()


def test_base_files_merge_recursively_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "root.yaml", "TRAIN:\n  EPOCHS: 7\nTAG: root\n")
    write(tmp_path / "sub" / "mid.yaml", "BASE: ['../root.yaml']\nTRAIN:\n  WARMUP_EPOCHS: 2\nTAG: mid\n")
    path = write(tmp_path / "sub" / "leaf.yaml", "BASE: ['mid.yaml']\nTAG: leaf\n")
    config = load_config(path)
    assert (config.TRAIN.EPOCHS, config.TRAIN.WARMUP_EPOCHS, config.TAG) == (7, 2, "leaf")


def test_missing_base_file_names_it(tmp_path):
    path = write(tmp_path / "a.yaml", "BASE: ['nowhere.yaml']\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*nowhere.yaml \(listed in BASE of .*a.yaml\)"):
        load_config(path)


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "BASE: ['b.yaml']\n")
    write(tmp_path / "b.yaml", "BASE: ['a.yaml']\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path / "typo.yaml", "TRAIN:\n  EPOCH: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key TRAIN.EPOCH"):
        load_config(path)


def test_wrong_type_names_key_and_source(tmp_path):
    path = write(tmp_path / "bad.yaml", "DATA:\n  BATCH_SIZE: lots\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: DATA.BATCH_SIZE must be of type int"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--opts: TRAIN.EPOCHS must be of type int"):
        load_config(None, opts=["TRAIN.EPOCHS", "ten"])


def test_int_is_accepted_for_a_float_key():
    assert load_config(None, opts=["MODEL.DROP_PATH_RATE", "0"]).MODEL.DROP_PATH_RATE == 0.0


def test_string_key_takes_text_as_written():
    assert load_config(None, opts=["TAG", "2024"]).TAG == "2024"


def test_flags_map_to_keys_and_opts_come_last():
    args = argparse.Namespace(batch_size=32, data_path="/data", zip=True, cache_mode="full", disable_amp=True,
                              tag="t", eval=True, optim="sgd", use_checkpoint=True, fused_window_process=None,
                              opts=["DATA.BATCH_SIZE", "16"])
    config = load_config(None, args=args)
    assert config.DATA.BATCH_SIZE == 16
    assert config.DATA.DATA_PATH == "/data" and config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == "full"
    assert not config.AMP_ENABLE and config.EVAL_MODE and config.TRAIN.USE_CHECKPOINT
    assert config.TRAIN.OPTIMIZER.NAME == "sgd" and not config.FUSED_WINDOW_PROCESS


def test_derived_values():
    config = load_config(None, opts=["DATA.BATCH_SIZE", "64", "TRAIN.ACCUMULATION_STEPS", "2", "TAG", "x"],
                         world_size=8)
    scale = 64 * 8 * 2 / 512
    assert config.TRAIN.BASE_LR == pytest.approx(5e-4 * scale)
    assert config.TRAIN.WARMUP_LR == pytest.approx(5e-7 * scale)
    assert config.TRAIN.MIN_LR == pytest.approx(5e-6 * scale)
    assert config.OUTPUT == "output/swin_tiny_patch4_window7_224/x"
    assert config.TEST.AMP_ENABLE == config.AMP_ENABLE


def test_22k_dataset_sets_its_class_count():
    assert load_config(None, opts=["DATA.DATASET", "imagenet22K"]).MODEL.NUM_CLASSES == 21841


def test_frozen_for_good():
    config = load_config(None)
    with pytest.raises(AttributeError):
        config.TRAIN.EPOCHS = 1


@pytest.mark.parametrize("opts,message", [
    (["DATA.BATCH_SIZE", "0"], "DATA.BATCH_SIZE must be a positive number"),
    (["DATA.BATCH_SIZE", "-4"], "DATA.BATCH_SIZE must be a positive number"),
    (["DATA.CACHE_MODE", "most"], "DATA.CACHE_MODE must be one of no, part, full"),
    (["AMP_DTYPE", "float8"], "AMP_DTYPE must be one of"),
    (["TRAIN.EPOCHS"], "odd number"),
])
def test_bad_values_are_rejected(opts, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, opts=opts)


def test_yaml_round_trip():
    config = load_config(None, opts=["TAG", "round"])
    again = cfg_lib.from_yaml(cfg_lib.to_yaml(config))
    assert again == config


def test_every_key_of_the_defaults_has_an_entry_in_the_validation_table():
    """A key added to the defaults must say what it accepts, or no run starts; an entry without a key is stale."""
    flat = cfg_lib._flatten(cfg_lib.get_defaults())
    assert sorted(set(flat) - set(cfg_lib.VALID)) == []
    assert sorted(set(cfg_lib.VALID) - set(flat)) == []
    for key, value in flat.items():  # every default is valid
        cfg_lib.VALID[key].check(key, value)


def test_a_key_missing_from_the_table_stops_the_start(monkeypatch):
    monkeypatch.delitem(cfg_lib.VALID, "AUG.MIXUP_MODE")
    with pytest.raises(ConfigError, match=r"config keys without an entry in config.VALID: AUG.MIXUP_MODE"):
        load_config(None)


@pytest.mark.parametrize("opts,message", [
    (["TEST.AMP_ENABLE", "True"], None), (["TEST.AMP_ENABLE", "None"], None),
    (["AUG.CUTMIX_MINMAX", "[0.2, 0.8]"], None), (["MODEL.SWIN.QK_SCALE", "0.125"], None),
    (["TRAIN.OPTIMIZER.NAME", "AdamW"], None), (["AUG.AUTO_AUGMENT", "augmix-m5"], None),
    (["AUG.CUTMIX_MINMAX", "[0.8, 0.2]"], r"AUG.CUTMIX_MINMAX must be \[lowest, highest\]"),
    (["AUG.CUTMIX_MINMAX", "0.5"], r"AUG.CUTMIX_MINMAX must be a list of numbers or None; got 0.5"),
    (["MODEL.SWIN.QK_SCALE", "-1.0"], r"MODEL.SWIN.QK_SCALE must be a positive number"),
    (["MODEL.SWINV2.ATTN_IMPL", "flash"], r"MODEL.SWINV2.ATTN_IMPL must be one of auto, sdpa, explicit"),
    (["TRAIN.OPTIMIZER.BETAS", "[0.9, 1.5]"], r"BETAS must be a list of 2 numbers, each at least 0 and below 1"),
    (["TRAIN.LAYER_DECAY", "0.0"], r"TRAIN.LAYER_DECAY must be above 0 and at most 1; got 0.0 \(1.0 turns it off\)"),
    (["DATA.INTERPOLATION", "cubic"], r"DATA.INTERPOLATION must be one of random, nearest, bilinear, bicubic"),
    (["SEED", "-1"], r"SEED must be at least 0"),
])
def test_table_accepts_and_refuses(opts, message):
    if message is None:
        load_config(None, opts=opts)
    else:
        with pytest.raises(ConfigError, match=message):
            load_config(None, opts=opts)


def test_base_must_list_files(tmp_path):
    path = write(tmp_path / "five.yaml", "BASE: 5\n")
    with pytest.raises(ConfigError, match=r"five.yaml: BASE must list config files to merge first, e.g. "
                                          r"BASE: \[base.yaml\]; got 5"):
        load_config(path)


def test_base_written_as_one_string_is_one_file(tmp_path):
    write(tmp_path / "parent.yaml", "TAG: from_parent\n")
    assert load_config(write(tmp_path / "child.yaml", "BASE: parent.yaml\n")).TAG == "from_parent"
