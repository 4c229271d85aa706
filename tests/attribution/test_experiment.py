import pytest

from attribution.experiment import ExperimentError, load_experiment, parse_experiment
from pipelines.experiments import DEFAULT_DIR


def write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_default_experiment_files_are_valid():
    names = [load_experiment(p).name for p in sorted(DEFAULT_DIR.glob("*.yaml"))]
    assert "digits" in names
    exp = load_experiment(DEFAULT_DIR / "digits.yaml")
    assert exp.data.source == "digits" and exp.data.train_size == 1000


def test_unknown_key_names_file_and_key(tmp_path):
    p = write(tmp_path, "name: x\ntraining:\n  stpes: 10\n")
    with pytest.raises(ExperimentError, match=r"exp\.yaml[\s\S]*training\.stpes[\s\S]*unknown key"):
        load_experiment(p)


def test_bad_value_names_key_and_value(tmp_path):
    p = write(tmp_path, "name: x\ntraining:\n  lr: -1\n")
    with pytest.raises(ExperimentError, match=r"training\.lr.*greater than 0.*-1"):
        load_experiment(p)


def test_cross_field_rule(tmp_path):
    p = write(tmp_path, "name: x\nmodel:\n  block_out_channels: [12, 16]\n  norm_num_groups: 8\n")
    with pytest.raises(ExperimentError, match=r"norm_num_groups=8 must divide.*\[12\]"):
        load_experiment(p)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ExperimentError, match="does not exist"):
        load_experiment(tmp_path / "nope.yaml")
    with pytest.raises(ExperimentError, match="not valid YAML"):
        load_experiment(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ExperimentError, match="mapping"):
        load_experiment(write(tmp_path, "- a\n- b\n"))


def test_name_must_be_an_asset_key_prefix():
    with pytest.raises(ExperimentError, match="name.*lower_snake_case"):
        parse_experiment({"name": "My Exp"})


def test_section_json_is_canonical():
    a = parse_experiment({"name": "a", "training": {"steps": 5}})
    b = parse_experiment({"training": {"steps": 5}, "name": "b"})
    assert a.section_json("training") == b.section_json("training")
    assert a.section_json("training") != parse_experiment({"name": "a"}).section_json("training")


def test_shapley_section_rules():
    from attribution.experiment import ExperimentError, parse_experiment

    base = {"name": "x", "attribution": {"methods": {"dtrak": {"kind": "trak"}}}}
    groups = [str(g) for g in range(10)]
    ok = parse_experiment({**base, "shapley": {"groups": groups, "n_coalitions": 22}})
    assert ok.shapley.estimators()[:2] == ["shapley_sparsified_finetune", "shapley_finetune"]
    assert not parse_experiment(base).shapley.enabled  # no section: no group attribution
    for bad, match in (({"groups": groups, "n_coalitions": 20}, "must exceed 2 x 10"),
                       ({"groups": ["0"]}, "at least 2 contributor groups"),
                       ({"groups": ["0", "0", "1"], "n_coalitions": 8}, "repeats a group"),
                       ({"groups": groups, "n_coalitions": 23}, "must be even"),
                       ({"groups": groups, "n_coalitions": 22, "lds_coalitions": 2}, ">= 3"),
                       ({"groups": groups, "n_coalitions": 22, "counterfactual_methods": ["shapley_retrain"]},
                        "not estimators"),
                       ({"groups": groups, "n_coalitions": 22, "aggregate": ["nope"]}, "not in attribution.methods")):
        with pytest.raises(ExperimentError, match=match):
            parse_experiment({**base, "shapley": bad})


def test_lora_section_rules():
    base = {"name": "x", "operations": {"inbox": False}}
    ok = parse_experiment({**base, "lora": {"pretrain_groups": ["0"]}})
    assert ok.lora.enabled and ok.lora.rank == 4 and not parse_experiment({"name": "x"}).lora.enabled
    cases = [
        ({"lora": {}}, "lora needs a base"),
        ({"lora": {"pretrain_groups": ["0"], "base_pipeline": "/sd"}}, "drop one of them"),
        ({"lora": {"pretrain_groups": ["0"], "prompt": "a painting"}}, r"must contain \{label\}"),
        ({"lora": {"pretrain_groups": ["0"], "rank": 0}}, "lora.rank"),
        ({"lora": {"pretrain_groups": ["0"]}, "operations": {"inbox": True}}, "inbox images carry no class label"),
        ({"lora": {"pretrain_groups": ["0", "1"]}, "shapley": {"groups": ["1", "2", "3"], "n_coalitions": 8}},
         r"shapley.groups \['1'\] are lora.pretrain_groups"),
    ]
    for extra, message in cases:
        with pytest.raises(ExperimentError, match=message):
            parse_experiment({**base, **extra})


def test_gpu_experiment_files_are_valid():
    files = sorted((DEFAULT_DIR / "gpu").glob("*.yaml"))
    assert [f.name for f in files] == ["cifar2.yaml"]
    exp = load_experiment(files[0])
    assert exp.device == "cuda" and exp.model.block_out_channels == [128, 256, 256, 256]
    assert exp.attribution.proj_dim == 32768 and exp.lds.n_subsets == 64 and len(exp.lds.seeds) == 3
