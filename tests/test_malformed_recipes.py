"""Malformed recipes, section by section: each one stops the real stage command (not only --dry-run) with exit 2,
one line naming the key and the bad value, no traceback, nothing written outside the run directory."""

import builtins

import pytest

from malformed import expect_user_error, tiny_raw, write_recipe

NAN, INF = float("nan"), float("inf")


def setting(path, value):
    """Case: set the dotted ``path`` (``[i]`` indexes a list) of the tiny recipe to ``value``."""
    def apply(raw):
        node, parts = raw, path.split(".")
        for part in parts[:-1]:
            name, _, index = part.partition("[")
            node = node.setdefault(name, {}) if not index else node[name][int(index[:-1])]
        name, _, index = parts[-1].partition("[")
        if index:
            node[name][int(index[:-1])] = value
        else:
            node[name] = value
    return apply


# name -> (mutation of the tiny recipe, stage, strings the error line must hold)
CASES = {
    # run
    "run.name escapes the root": (setting("run.name", "../../x"), "pretrain", ["run.name = '../../x'", ".."]),
    "run.name with a separator": (setting("run.name", "a/b"), "pretrain", ["run.name = 'a/b'", "separator"]),
    "run.name backslash": (setting("run.name", "a\\b"), "data", ["run.name", "separator"]),
    "run.name empty": (setting("run.name", ""), "pretrain", ["run.name = ''", "empty"]),
    "run.name dot-dot": (setting("run.name", ".."), "pretrain", ["run.name = '..'"]),
    "run.seed negative": (setting("run.seed", -1), "pretrain", ["run.seed = -1", ">= 0"]),
    "run.device": (setting("run.device", "gpu"), "pretrain", ["run.device = 'gpu'", "auto, cpu, cuda"]),
    # model
    "model.hidden_size zero": (setting("model.hidden_size", 0), "pretrain", ["model.hidden_size = 0", ">= 1"]),
    "model.num_attention_heads zero": (setting("model.num_attention_heads", 0), "pretrain",
                                       ["model.num_attention_heads = 0"]),
    "model.num_attention_heads negative": (setting("model.num_attention_heads", -4), "pretrain",
                                           ["model.num_attention_heads = -4"]),
    "model.num_query_groups above heads": (setting("model.num_query_groups", 8), "pretrain",
                                           ["model.num_query_groups = 8", "model.num_attention_heads = 4"]),
    "model.moe_ffn_hidden_size zero": (setting("model.moe_ffn_hidden_size", 0), "pretrain",
                                       ["model.moe_ffn_hidden_size = 0"]),
    "model.mamba_state_dim zero": (setting("model.mamba_state_dim", 0), "pretrain", ["model.mamba_state_dim = 0"]),
    "model.mamba_num_heads negative": (setting("model.mamba_num_heads", -8), "pretrain",
                                       ["model.mamba_num_heads = -8"]),
    "model.mamba_head_dim zero": (setting("model.mamba_head_dim", 0), "pretrain", ["model.mamba_head_dim = 0"]),
    "model.mamba_chunk_size zero": (setting("model.mamba_chunk_size", 0), "pretrain", ["model.mamba_chunk_size = 0"]),
    "model.attention_head_dim zero": (setting("model.attention_head_dim", 0), "pretrain",
                                      ["model.attention_head_dim = 0"]),
    "model.max_sequence_length zero": (setting("model.max_sequence_length", 0), "pretrain",
                                       ["model.max_sequence_length = 0"]),
    "model.vocab_size negative": (setting("model.vocab_size", -1), "params", ["model.vocab_size = -1"]),
    "model.num_experts zero": (setting("model.num_experts", 0), "pretrain", ["model.num_experts = 0"]),
    "model.moe_topk zero": (setting("model.moe_topk", 0), "pretrain", ["model.moe_topk = 0"]),
    "model.norm_eps zero": (setting("model.norm_eps", 0.0), "pretrain", ["model.norm_eps = 0.0", "> 0"]),
    "model.norm_eps nan": (setting("model.norm_eps", NAN), "pretrain", ["model.norm_eps = nan", "finite"]),
    "model.init_std negative": (setting("model.init_std", -0.02), "pretrain", ["model.init_std = -0.02"]),
    "model.moe_topk_scaling_factor inf": (setting("model.moe_topk_scaling_factor", INF), "pretrain",
                                          ["model.moe_topk_scaling_factor = inf"]),
    "model.activation": (setting("model.activation", "relu"), "pretrain", ["model.activation = 'relu'"]),
    "model.pattern empty": (setting("model.pattern", ""), "pretrain", ["model.pattern = ''"]),
    # parallelism
    "parallelism.tp zero": (setting("parallelism.tp", 0), "pretrain", ["parallelism.tp = 0"]),
    "parallelism.pp negative": (setting("parallelism.pp", -1), "pretrain", ["parallelism.pp = -1"]),
    "parallelism.cp zero": (setting("parallelism.cp", 0), "pretrain", ["parallelism.cp = 0"]),
    "parallelism.pp_layers zero entry": (setting("parallelism.pp_layers", [0, 8]), "pretrain",
                                         ["parallelism.pp_layers = [0, 8]", "item [0]"]),
    "parallelism.recompute": (setting("parallelism.recompute", "sometimes"), "pretrain",
                              ["parallelism.recompute = 'sometimes'"]),
    # data
    "data source weight negative": (setting("data.sources[0].weight", -1.0), "data",
                                    ["data.sources[0].weight = -1.0"]),
    "data source weight nan": (setting("data.sources[1].weight", NAN), "data", ["data.sources[1].weight = nan"]),
    "data source name escapes": (setting("data.sources[0].name", "../x"), "data", ["data.sources[0].name = '../x'"]),
    "data source format": (setting("data.sources[0].format", "markdown"), "data",
                           ["data.sources[0].format = 'markdown'"]),
    "data.calibration_seq_length zero": (setting("data.calibration_seq_length", 0), "data",
                                         ["data.calibration_seq_length = 0"]),
    "data.num_workers negative": (setting("data.num_workers", -1), "data", ["data.num_workers = -1"]),
    "data.demo_corpus.records negative": (setting("data.demo_corpus.records", -5), "data",
                                          ["data.demo_corpus.records = -5"]),
    "data.split": (setting("data.split", "a,b,c"), "data", ["data.split = 'a,b,c'"]),
    "data source text_field empty": (setting("data.sources[1].text_field", ""), "data",
                                     ["data.sources[1].text_field = ''", "empty"]),
    # training (the top-level section every stage inherits)
    "training.lr negative": (setting("training.lr", -1e-3), "pretrain", ["training.lr = -0.001", "> 0"]),
    "training.lr nan": (setting("training.lr", NAN), "pretrain", ["training.lr = nan"]),
    "training.lr inf": (setting("training.lr", INF), "pretrain", ["training.lr = inf"]),
    "training.lr zero": (setting("training.lr", 0.0), "pretrain", ["training.lr = 0.0"]),
    "training.min_lr above lr": (setting("training.min_lr", 1e-2), "pretrain",
                                 ["training.min_lr = 0.01 exceeds lr = 0.003"]),
    "training.adam_beta1 one": (setting("training.adam_beta1", 1.0), "pretrain", ["training.adam_beta1 = 1.0", "< 1"]),
    "training.adam_beta2 negative": (setting("training.adam_beta2", -0.1), "pretrain",
                                     ["training.adam_beta2 = -0.1", ">= 0"]),
    "training.adam_beta2 above one": (setting("training.adam_beta2", 1.5), "pretrain", ["training.adam_beta2 = 1.5"]),
    "training.adam_eps zero": (setting("training.adam_eps", 0.0), "pretrain", ["training.adam_eps = 0.0"]),
    "training.micro_batch_size zero": (setting("training.micro_batch_size", 0), "pretrain",
                                       ["training.micro_batch_size = 0"]),
    "training.global_batch_size zero": (setting("training.global_batch_size", 0), "pretrain",
                                        ["training.global_batch_size = 0"]),
    "training.seq_length zero": (setting("training.seq_length", 0), "pretrain", ["training.seq_length = 0"]),
    "training.seq_length negative": (setting("training.seq_length", -128), "pretrain",
                                     ["training.seq_length = -128"]),
    "training.train_iters zero": (setting("training.train_iters", 0), "pretrain", ["training.train_iters = 0"]),
    "training.train_iters negative": (setting("training.train_iters", -5), "pretrain",
                                      ["training.train_iters = -5"]),
    "training.weight_decay negative": (setting("training.weight_decay", -0.1), "pretrain",
                                       ["training.weight_decay = -0.1"]),
    "training.clip_grad negative": (setting("training.clip_grad", -1.0), "pretrain", ["training.clip_grad = -1.0"]),
    "training.lr_warmup_iters negative": (setting("training.lr_warmup_iters", -1), "pretrain",
                                          ["training.lr_warmup_iters = -1"]),
    "training.eval_iters zero": (setting("training.eval_iters", 0), "pretrain", ["training.eval_iters = 0"]),
    "training.precision": (setting("training.precision", "fp16"), "pretrain", ["training.precision = 'fp16'"]),
    # checkpointing, logging
    "checkpointing.save_interval negative": (setting("checkpointing.save_interval", -1), "pretrain",
                                             ["checkpointing.save_interval = -1"]),
    "checkpointing.keep_last negative": (setting("checkpointing.keep_last", -2), "pretrain",
                                         ["checkpointing.keep_last = -2"]),
    "logging.log_interval zero": (setting("logging.log_interval", 0), "pretrain", ["logging.log_interval = 0"]),
    "logging.log_interval negative": (setting("logging.log_interval", -5), "pretrain",
                                      ["logging.log_interval = -5"]),
    "logging.peak_tflops negative": (setting("logging.peak_tflops", -1.0), "pretrain",
                                     ["logging.peak_tflops = -1.0"]),
    # elastic
    "elastic budgets with one fraction": (setting("elastic.budgets[2].fraction", 0.75), "stage1",
                                          ["elastic.budgets", "fraction 0.75"]),
    "elastic budget name escapes": (setting("elastic.budgets[1].name", "../x"), "stage1",
                                    ["elastic.budgets[1].name = '../x'"]),
    "elastic budget name separator": (setting("elastic.budgets[1].name", "a/b"), "stage1",
                                      ["elastic.budgets[1].name = 'a/b'"]),
    "elastic budget name empty": (setting("elastic.budgets[0].name", ""), "stage1",
                                  ["elastic.budgets[0].name = ''"]),
    "elastic budget fraction above one": (setting("elastic.budgets[1].fraction", 1.5), "stage1",
                                          ["elastic.budgets[1].fraction = 1.5"]),
    "elastic budget fraction zero": (setting("elastic.budgets[2].fraction", 0.0), "stage1",
                                     ["elastic.budgets[2].fraction = 0.0"]),
    "elastic.tau_decay nan": (setting("elastic.tau_decay", NAN), "stage1", ["elastic.tau_decay = nan"]),
    "elastic.router_hidden zero": (setting("elastic.router_hidden", 0), "stage1", ["elastic.router_hidden = 0"]),
    "elastic.size_multiple zero": (setting("elastic.size_multiple", 0), "stage1", ["elastic.size_multiple = 0"]),
    "elastic axis negative choice": (setting("elastic.axes.hidden", [128, -64]), "stage1",
                                     ["elastic.axes.hidden = [128, -64]", "item [1]"]),
    "elastic.dead_zone one": (setting("elastic.dead_zone", 1.0), "stage1", ["elastic.dead_zone = 1.0"]),
    "elastic.target": (setting("elastic.target", "flops"), "stage1", ["elastic.target = 'flops'"]),
    # stage blocks
    "pretrain.training.lr negative": (setting("pretrain.training.lr", -1.0), "pretrain",
                                      ["pretrain.training.lr = -1.0"]),
    "pretrain.training.train_iters zero": (setting("pretrain.training.train_iters", 0), "pretrain",
                                           ["pretrain.training.train_iters = 0"]),
    "importance.micro_batch_size zero": (setting("importance.micro_batch_size", 0), "importance",
                                         ["importance.micro_batch_size = 0"]),
    "importance.samples negative": (setting("importance.samples", -1), "importance", ["importance.samples = -1"]),
    "importance.precision": (setting("importance.precision", "fp16"), "importance",
                             ["importance.precision = 'fp16'"]),
    "stage1.training.micro_batch_size zero": (setting("stage1.training.micro_batch_size", 0), "stage1",
                                              ["stage1.training.micro_batch_size = 0"]),
    "stage1.masks": (setting("stage1.masks", "medium"), "stage1", ["stage1.masks = 'medium'"]),
    "stage2.budget_weights negative": (setting("stage2.budget_weights", [0.5, -0.3, 0.2]), "stage2",
                                       ["stage2.budget_weights = [0.5, -0.3, 0.2]"]),
    "stage2.training.min_lr above lr": (setting("stage2.training.min_lr", 1e-3), "stage2",
                                        ["stage2.training.min_lr = 0.001 exceeds lr = 0.0005"]),
    "stage2.training.adam_beta1 nan": (setting("stage2.training.adam_beta1", NAN), "stage2",
                                       ["stage2.training.adam_beta1 = nan"]),
    # budget_eval
    "budget_eval.num_problems zero": (setting("budget_eval.num_problems", 0), "budget-eval",
                                      ["budget_eval.num_problems = 0"]),
    "budget_eval.token_budget_caps negative": (setting("budget_eval.token_budget_caps", [4, -1]), "budget-eval",
                                               ["budget_eval.token_budget_caps = [4, -1]", "item [1]"]),
    "budget_eval.engine": (setting("budget_eval.engine", "fused"), "budget-eval", ["budget_eval.engine = 'fused'"]),
    # slurm
    "slurm.nodes zero": (setting("slurm.nodes", 0), "pretrain", ["slurm.nodes = 0"]),
    "slurm.master_port": (setting("slurm.master_port", 70000), "pretrain", ["slurm.master_port = 70000"]),
    "slurm.time": (setting("slurm.time", "forever"), "pretrain", ["slurm.time = 'forever'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_value(case, tmp_path, capsys):
    mutate, stage, expected = CASES[case]
    raw = tiny_raw(tmp_path)
    mutate(raw)
    path = write_recipe(tmp_path, raw)
    # the run dir must stay untouched; a bad run.name has no run dir of its own
    expect_user_error([stage, "--recipe", path], capsys, tmp_path, path, *expected)
    assert not (tmp_path / "runs").exists()


# Whole-file problems: name -> (file content, strings the error line must hold besides the file name)
FILES = {
    "empty file": ("", ["the recipe is empty"]),
    "only comments": ("# nothing here\n\n", ["the recipe is empty"]),
    "duplicate section": ("run:\n  name: a\nmodel:\n  hidden_size: 64\nmodel:\n  hidden_size: 32\n",
                          [":5: key 'model' is given twice (first at line 3)"]),
    "duplicate nested key": ("training:\n  lr: 1.0e-3\n  min_lr: 0.0\n  lr: 1.0e-2\n",
                             [":4: key 'lr' is given twice (first at line 2)"]),
    "duplicate key in a flow mapping": ("elastic:\n  budgets:\n    - {name: a, fraction: 1.0, name: b}\n",
                                        [":3: key 'name' is given twice"]),
    "binary junk": (bytes(range(256)) * 4, ["not a text (UTF-8) recipe file"]),
    "latin-1 comment": ("# caf\xe9\nrun:\n  name: a\n".encode("latin-1"), ["not a text (UTF-8) recipe file (byte 5)"]),
    "control character": ("run:\n  name: a\x07b\n", ["not valid YAML"]),
    "a list": ("- run\n- model\n", ["a recipe must be a mapping of sections, got list"]),
    "a scalar": ("hello\n", ["a recipe must be a mapping of sections, got str"]),
    "unknown section": ("trainig:\n  lr: 1.0e-3\n", ["unknown key 'trainig' (did you mean 'training'?)"]),
    "section is a list": ("training: [1, 2]\n", ["training must be a mapping"]),
    "bad indentation": ("run:\n  name: a\n   seed: 3\n", ["not valid YAML"]),
}


@pytest.mark.parametrize("case", list(FILES))
def test_malformed_file(case, tmp_path, capsys):
    text, expected = FILES[case]
    path = write_recipe(tmp_path, text)
    expect_user_error(["pretrain", "--recipe", path], capsys, tmp_path, path, *expected)


def test_unreadable_recipe(tmp_path, capsys, monkeypatch):
    # chmod 000 does not stop root (CI runs as root), so the permission error is raised where open() is called
    path = write_recipe(tmp_path, "run:\n  name: a\n")
    real_open = builtins.open

    def guarded(file, *a, **k):
        if str(file) == path:
            raise PermissionError(13, "Permission denied", path)
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    expect_user_error(["pretrain", "--recipe", path], capsys, tmp_path, path, "cannot read the recipe",
                      "Permission denied")


def test_dry_run_refuses_what_the_real_run_would(tmp_path, capsys):
    """--dry-run runs the same checks: the values the run used to die on no longer pass it."""
    for case in ("training.micro_batch_size zero", "training.min_lr above lr", "model.mamba_state_dim zero",
                 "logging.log_interval zero", "training.train_iters zero", "run.name escapes the root"):
        mutate, stage, expected = CASES[case]
        raw = tiny_raw(tmp_path)
        mutate(raw)
        path = write_recipe(tmp_path, raw, name="dry.yaml")
        expect_user_error([stage, "--recipe", path, "--dry-run"], capsys, tmp_path, *expected)

