"""m3composer/config.py: YAML + overrides -> typed config; bad keys and values fail naming the key."""
from pathlib import Path

import pytest
from omegaconf.errors import ConfigKeyError, ValidationError

from m3composer.config import ConfigError, TrainConfig, load_config

MINIMAL = "run_name: t\nmodel: {name_or_path: asset:tiny-xlmr}\ndata: {train_data: /tmp/mds}\n"


@pytest.fixture
def yaml_path(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(MINIMAL)
    return p


def test_yaml_and_overrides_merge_into_the_dataclass(yaml_path):
    cfg = load_config(yaml_path, ["trainer.max_duration=8ba", "data.train_group_size=4", "loss.temperature=0.05"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.trainer.max_duration == "8ba"
    assert cfg.data.train_group_size == 4
    assert cfg.loss.temperature == 0.05
    assert cfg.run_dir == "runs/t"          # interpolated from run_name
    assert cfg.data.query_max_len == 32      # FlagEmbedding's default


def test_unknown_key_is_named_with_a_suggestion(yaml_path):
    with pytest.raises(ConfigKeyError, match="max_durration.*Did you mean: 'max_duration'"):
        load_config(yaml_path, ["trainer.max_durration=8ba"])


def test_unknown_key_in_yaml_fails(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(MINIMAL + "loss: {temprature: 0.02}\n")
    with pytest.raises(ConfigKeyError, match="temprature"):
        load_config(p)


def test_wrong_type_names_the_key(yaml_path):
    with pytest.raises(ValidationError, match="data.train_group_size"):
        load_config(yaml_path, ["data.train_group_size=four"])


def test_missing_required_value_is_named(tmp_path):
    p = tmp_path / "noname.yaml"
    p.write_text("model: {name_or_path: x}\n")
    with pytest.raises(ConfigError, match="data.train_data, run_name"):
        load_config(p)


@pytest.mark.parametrize("override, key", [
    ("data.tail=sometimes", "data.tail"),
    ("data.shuffle_ratio=1.5", "data.shuffle_ratio"),
    ("loss.temperature=0", "loss.temperature"),
    ("loss.self_distill_start_step=soon", "loss.self_distill_start_step"),
    ("optimizer.warmup_ratio=1.2", "optimizer.warmup_ratio"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("trainer.max_duration=forever", "trainer.max_duration"),
    ("trainer.autoresume=true", "trainer.autoresume"),
    ("model.pooling=max", "model.pooling"),
    ("loss.negatives_cross_device_heads=sparse", "loss.negatives_cross_device_heads"),
])
def test_out_of_range_values_fail_naming_the_key(yaml_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(yaml_path, [override])


def test_every_head_across_ranks_needs_cross_device_negatives(yaml_path):
    with pytest.raises(ConfigError, match=r"loss\.negatives_cross_device_heads: all needs"):
        load_config(yaml_path, ["loss.negatives_cross_device_heads=all", "loss.negatives_cross_device=false"])
    cfg = load_config(yaml_path, ["loss.negatives_cross_device_heads=all", "loss.negatives_cross_device=true"])
    assert cfg.loss.negatives_cross_device_heads == "all"


def test_self_distill_needs_two_heads(yaml_path):
    for heads in ("[dense]", "[sparse]"):
        with pytest.raises(ConfigError, match=r"loss\.use_self_distill: needs two or more loss\.heads"):
            load_config(yaml_path, ["loss.use_self_distill=true", f"loss.heads={heads}"])
    assert load_config(yaml_path, ["loss.use_self_distill=true", "loss.heads=[sparse,colbert]"]).loss.use_self_distill


def test_heads_default_to_the_recipe_and_take_any_non_empty_subset(yaml_path):
    assert load_config(yaml_path).loss.heads == ["dense", "sparse", "colbert"]
    assert load_config(yaml_path, ["loss.heads=[colbert,dense]"]).loss.heads == ["colbert", "dense"]
    for heads, message in (("[]", "must name at least one head"), ("[dense,dense]", "names a head twice"),
                           ("[dense,lexical]", r"each must be dense, sparse or colbert, got \['lexical'\]")):
        with pytest.raises(ConfigError, match=rf"loss\.heads: {message}"):
            load_config(yaml_path, [f"loss.heads={heads}"])


def test_unified_finetuning_is_replaced_by_heads_with_an_error_saying_what_to_write(yaml_path, tmp_path):
    with pytest.raises(ConfigError, match=r"loss\.unified_finetuning \(override\) was replaced by loss\.heads.*"
                                          r"false is loss\.heads=\[dense\]"):
        load_config(yaml_path, ["loss.unified_finetuning=false"])
    old = tmp_path / "old.yaml"
    old.write_text(MINIMAL + "loss: {unified_finetuning: true}\n")
    with pytest.raises(ConfigError, match=rf"loss\.unified_finetuning \({old}\) was replaced by loss\.heads"):
        load_config(old)


def test_cross_device_dense_negatives_need_the_dense_head(yaml_path):
    with pytest.raises(ConfigError, match=r"loss\.negatives_cross_device: gathers the dense head's negatives only"):
        load_config(yaml_path, ["loss.negatives_cross_device=true", "loss.heads=[sparse]"])
    cfg = load_config(yaml_path, ["loss.negatives_cross_device=true", "loss.heads=[sparse]",
                                  "loss.negatives_cross_device_heads=all"])
    assert cfg.loss.heads == ["sparse"]


def test_matryoshka_is_off_by_default_and_bad_sizes_or_weights_fail_naming_the_key(yaml_path):
    mrl = load_config(yaml_path).loss.matryoshka
    assert mrl.dense_dims == mrl.colbert_dims == mrl.dense_weights == mrl.colbert_weights == []
    cfg = load_config(yaml_path, ["loss.matryoshka.dense_dims=[16,8]", "loss.matryoshka.dense_weights=[1,0.5]",
                                  "loss.matryoshka.colbert_dims=[8,4]"])
    assert (cfg.loss.matryoshka.dense_dims, cfg.loss.matryoshka.colbert_dims) == ([16, 8], [8, 4])
    for overrides, message in (
            (["loss.matryoshka.dense_dims=[8,0]"], r"dense_dims: each size must be positive"),
            (["loss.matryoshka.colbert_dims=[8,8]"], r"colbert_dims: lists a size twice"),
            (["loss.matryoshka.dense_dims=[16,8]", "loss.matryoshka.dense_weights=[1]"],
             r"dense_weights: needs one weight per size of loss\.matryoshka\.dense_dims \(2\), got 1"),
            (["loss.matryoshka.colbert_dims=[8]", "loss.matryoshka.colbert_weights=[-1]"],
             r"colbert_weights: each weight must be a positive number"),
            (["loss.matryoshka.colbert_dims=[8]", "loss.heads=[dense,sparse]"],
             r"colbert_dims: colbert is not in loss\.heads"),
            (["loss.matryoshka.dense_dims=[16]", "loss.matryoshka.colbert_dims=[8,4]"],
             r"colbert_dims: needs as many sizes as loss\.matryoshka\.dense_dims")):
        with pytest.raises(ConfigError, match=rf"loss\.matryoshka\.{message}"):
            load_config(yaml_path, overrides)


def test_override_without_equals_is_rejected(yaml_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(yaml_path, ["trainer.max_duration"])


def test_shipped_recipes_load():
    from pathlib import Path
    recipes = sorted(Path(__file__).resolve().parents[1].joinpath("yamls").glob("*.yaml"))
    assert recipes, "yamls/ has no recipe"
    for recipe in recipes:
        cfg = load_config(recipe, ["data.train_data=/tmp/mds"])   # the GPU recipe requires it
        assert cfg.run_name
    with pytest.raises(ConfigError, match="data.train_data"):
        load_config(recipes[0].parent / "bge-m3-unified.yaml")


def test_gradient_cache_is_off_by_default_and_bad_settings_fail_naming_the_key(yaml_path):
    assert not load_config(yaml_path).model.gradient_cache.enabled
    on = ["model.gradient_cache.enabled=true"]
    cfg = load_config(yaml_path, on + ["model.gradient_cache.max_sequences=4", "model.gradient_cache.max_tokens=null"])
    assert (cfg.model.gradient_cache.max_sequences, cfg.model.gradient_cache.max_tokens) == (4, None)
    with pytest.raises(ConfigError, match=r"model\.gradient_cache\.max_tokens: 100 is smaller than one sequence"):
        load_config(yaml_path, on + ["data.passage_max_len=128", "model.gradient_cache.max_tokens=100"])
    with pytest.raises(ConfigError, match=r"model\.gradient_cache\.max_sequences: must be >= 1"):
        load_config(yaml_path, on + ["model.gradient_cache.max_sequences=0"])
    with pytest.raises(ConfigError, match=r"model\.gradient_cache\.enabled: .*trainer\.fsdp"):
        load_config(yaml_path, on + ["trainer.fsdp=true"])
    # a budget below one sequence is harmless while the cache is off
    assert load_config(yaml_path, ["model.gradient_cache.max_tokens=100"]).model.gradient_cache.max_tokens == 100


def test_negative_refresh_is_off_by_default_and_bad_settings_fail_naming_the_key(yaml_path):
    assert load_config(yaml_path).callbacks.negative_refresh is None
    cfg = load_config(yaml_path, ["callbacks.negative_refresh.interval=2ep", "callbacks.negative_refresh.range=5-50"])
    refresh = cfg.callbacks.negative_refresh
    assert (refresh.interval, refresh.range, refresh.head, refresh.negatives) == ("2ep", "5-50", "dense", 7)
    key = "callbacks.negative_refresh"
    for head in ("sparse", "colbert", "ensemble"):
        assert load_config(yaml_path, [f"{key}.head={head}"]).callbacks.negative_refresh.head == head
    for override, message in ((f"{key}.interval=100ba", r"\.interval: must be a whole number of epochs"),
                              (f"{key}.head=bm25", r"\.head: must be dense, sparse, colbert or ensemble, got 'bm25'"),
                              (f"{key}.range=20-10", r"\.range: range needs 1 <= FIRST <= LAST"),
                              (f"{key}.negatives=0", r"\.negatives: must be >= 1"),
                              ("trainer.fsdp=true", r": is not supported with trainer\.fsdp")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.") + message):
            load_config(yaml_path, [f"{key}.interval=1ep", override])
    with pytest.raises(ConfigKeyError, match="bogus"):
        load_config(yaml_path, [f"{key}.bogus=1"])


@pytest.mark.parametrize("name", ["quickstart-cpu", "kd-cpu"])
def test_a_recipes_outputs_and_data_move_with_run_dir(name):
    """A copied recipe with its own run_dir writes nowhere near the original's (yaml interpolation)."""
    from pathlib import Path
    recipe = Path(__file__).resolve().parents[1] / "yamls" / f"{name}.yaml"
    default, moved = load_config(recipe), load_config(recipe, ["run_dir=/elsewhere/mine"])
    paths = lambda cfg: [cfg.data.train_data, cfg.trainer.save_folder, cfg.callbacks.export_dir]
    assert all(p.startswith(default.run_dir + "/") for p in paths(default))
    assert all(p.startswith("/elsewhere/mine/") for p in paths(moved))


def test_no_function_in_the_package_restates_a_schema_default():
    """Each setting's default is written once, in the schema: a parameter named like a schema key
    (its last part) must not carry the same literal default anywhere else in the package (None and
    False are too common to count). A shared value is a named constant both import."""
    import ast
    import dataclasses
    import typing

    by_name: dict[str, list[tuple[str, object]]] = {}

    def walk(section: type, prefix: str = "") -> None:    # every section, the optional ones too
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            hint = hints[f.name]
            kind = next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)
            if kind is not None:
                walk(kind, f"{prefix}{f.name}.")
            elif f.default is not dataclasses.MISSING and f.default is not None and f.default is not False:
                by_name.setdefault(f.name, []).append((prefix + f.name, f.default))

    walk(TrainConfig)
    package = Path(__file__).resolve().parents[1] / "m3composer"
    restated = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            with_defaults = list(zip(a.args[len(a.args) - len(a.defaults):], a.defaults))
            with_defaults += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
            for arg, default in with_defaults:
                if isinstance(default, ast.Constant):
                    restated += [f"{path.relative_to(package.parent)}:{node.lineno} {node.name}({arg.arg}="
                                 f"{default.value!r}) restates {key}" for key, value in by_name.get(arg.arg, [])
                                 if value == default.value and type(value) is type(default.value)]
    assert not restated, "\n".join(restated)


def test_sparsity_regulariser_is_off_by_default_and_checked(yaml_path):
    from m3composer.algorithms import SparsityWarmup
    from m3composer.model.composer_model import SparsityRegularizer
    from m3composer.train import build_algorithms, composer_model_settings

    cfg = load_config(yaml_path)
    assert cfg.loss.sparsity.regularizer == "none"
    assert composer_model_settings(cfg)["sparsity"] is None
    assert not any(isinstance(a, SparsityWarmup) for a in build_algorithms(cfg))
    on = load_config(yaml_path, ["loss.sparsity.regularizer=flops", "loss.sparsity.query_weight=0.3",
                                 "loss.sparsity.passage_weight=0.1", "loss.sparsity.warmup=100ba"])
    assert composer_model_settings(on)["sparsity"] == SparsityRegularizer("flops", 0.3, 0.1)
    assert [a.warmup.value for a in build_algorithms(on) if isinstance(a, SparsityWarmup)] == [100]
    for overrides, message in (
            (["loss.sparsity.regularizer=l2"], r"loss\.sparsity\.regularizer: must be none, flops or l1, got 'l2'"),
            (["loss.sparsity.query_weight=-1"], r"loss\.sparsity\.query_weight: must be a number >= 0"),
            (["loss.sparsity.passage_weight=nan"], r"loss\.sparsity\.passage_weight: must be a number >= 0"),
            (["loss.sparsity.warmup=soon"], r"loss\.sparsity\.warmup: 'soon' is not a Composer time"),
            (["loss.sparsity.regularizer=l1"], r"loss\.sparsity\.regularizer: l1 needs loss\.sparsity\.query_weight"),
            (["loss.sparsity.regularizer=flops", "loss.sparsity.query_weight=1", "loss.heads=[dense,colbert]"],
             r"loss\.sparsity\.regularizer: flops regularises the lexical weights: it needs sparse in loss\.heads")):
        with pytest.raises(ConfigError, match=message):
            load_config(yaml_path, overrides)


def test_sparse_threshold_is_checked_and_reaches_the_model(yaml_path):
    from m3composer.train import build_model, model_aware_defaults, resolve_model_path

    with pytest.raises(ConfigError, match=r"model\.sparse_threshold: must be a number >= 0"):
        load_config(yaml_path, ["model.sparse_threshold=-0.1"])
    cfg = load_config(yaml_path, ["model.sparse_threshold=0.05"])
    folder = resolve_model_path(cfg.model.name_or_path)
    model = build_model(cfg, folder, model_aware_defaults(cfg, folder))
    assert model.model.sparse_threshold == 0.05 and model.model.folder_config().sparse_threshold == 0.05
