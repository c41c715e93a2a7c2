import pytest

from clbench import ClbenchError
from clbench.cli import main
from clbench.config import RunConfig, resolve


def test_defaults_then_yaml_then_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 4\nepochs: {seg: 1, det: 2, cls: 3}\nimage_size: 96\n")
    config = resolve(cfg, {"seed": "7"})
    assert config.seed == 7                                   # CLI beats YAML
    assert config.epochs == {"seg": 1, "det": 2, "cls": 3}    # YAML beats defaults
    assert config.image_size == 96
    assert config.strategy == RunConfig().strategy            # untouched default


def test_per_task_values_from_the_cli():
    assert resolve(None, {"epochs": "5"}).epochs == {"seg": 5, "det": 5, "cls": 5}
    assert resolve(None, {"lr": "seg=0.1,det=0.2,cls=0.3"}).lr == {"seg": 0.1, "det": 0.2, "cls": 0.3}
    with pytest.raises(ClbenchError, match="epochs: unknown task 'dett', expected some of seg, det, cls"):
        resolve(None, {"epochs": "seg=1,dett=2,cls=3"})


def test_unknown_yaml_key_is_an_error_with_a_suggestion(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("image_sise: 96\n")
    with pytest.raises(ClbenchError, match=r"c.yaml: unknown key 'image_sise'; did you mean 'image_size'\?"):
        resolve(cfg, {})


def test_bad_yaml_value_names_the_file_and_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("order: seg,det,seg\n")
    with pytest.raises(ClbenchError, match="c.yaml: order = .seg,det,seg.: expected a permutation"):
        resolve(cfg, {})


def test_unknown_flag_exits_nonzero_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--image-sise", "96"])
    assert exc.value.code == 2
    assert "unknown argument '--image-sise'; did you mean '--image-size'?" in capsys.readouterr().err


def test_bad_value_on_the_command_line_is_one_line_and_exit_2(capsys):
    assert main(["run", "--head-stride", "32", "--epochs", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "clbench: error: --head-stride: head_stride = '32': expected one of 8, 16"
    assert main(["run", "--epochs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "clbench: error: --epochs: epochs = '0': expected a positive number"


def test_unknown_strategy_lists_what_exists(tiny_args, capsys):
    args = ["run"] + [f"--{k.replace('_', '-')}={v}" for k, v in tiny_args.items()] + ["--strategy", "naiv"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "strategy 'naiv' not found; did you mean 'naive'?" in err and "naive, pod, replay, si)" in err


def test_repeated_set_flags_reach_the_strategy(tiny_args, capsys):
    args = ["run"] + [f"--{k.replace('_', '-')}={v}" for k, v in tiny_args.items()]
    assert main(args + ["--strategy", "lwf", "--set", "lwf.lam=2", "--set", "lwf.lamb=3"]) == 2
    assert "--set lwf.lamb: 'lwf' has no hyperparameter 'lamb'; did you mean 'lam'?" in capsys.readouterr().err
    assert resolve(None, {"set": ["lwf.lam=2", "lwf.temperature=3"]}).set == {"lwf.lam": "2", "lwf.temperature": "3"}
