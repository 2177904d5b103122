"""LoRA / LyCORIS adapters (`sdjax.lora`, `DiffusionPipeline.load_lora_weights`) against diffusers' own
`load_lora_weights` / `set_adapters` on tiny random models (fp32, final images <= 5e-4), LoHa / LoKr against their
published definition (the merged weights computed in PyTorch here, then diffusers without adapters), unloading
bit-exact, and no recompile of the generation program when adapters or weights change."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' load_lora_weights needs it

from safetensors.torch import save_file  # noqa: E402

import sdjax  # noqa: E402
from sdjax.lora.formats import AdapterFormatError  # noqa: E402

from pipeline_fixtures import (CompileLog, build_pipeline, build_sdxl, diffusers_scheduler,  # noqa: E402
                               quick_compiles)

H, W = 32, 32
LATENT = (H // 2, W // 2, 4)
PROMPTS = ["a red circle on a blue background", "a green square"]
STEPS = 3
TOL = 5e-4

_quick = pytest.fixture(scope="module", autouse=True)(quick_compiles)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_models")
    return {"sd1": build_pipeline(root / "sd1", kind="sd1"), "sdxl": build_sdxl(root / "sdxl")}


@pytest.fixture(scope="module")
def sd1(folders):
    return sdjax.StableDiffusionPipeline.from_pretrained(folders["sd1"])


@pytest.fixture(scope="module")
def sdxl(folders):
    return sdjax.StableDiffusionPipeline.from_pretrained(folders["sdxl"])


def reference(folders, kind):
    """A fresh diffusers pipeline (adapters change it in place)."""
    klass = diffusers.StableDiffusionPipeline if kind == "sd1" else diffusers.StableDiffusionXLPipeline
    extra = dict(safety_checker=None, requires_safety_checker=False) if kind == "sd1" else {}
    pipe = klass.from_pretrained(folders[kind], **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler("ddim", pipe)
    return pipe


def latents(seed=1):
    return np.random.default_rng(seed).standard_normal((len(PROMPTS), *LATENT)).astype(np.float32)


def ours(pipe, lat=None):
    return pipe(PROMPTS, height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0, sampler="ddim",
                latents=latents() if lat is None else lat, output_type="np").images


def theirs(pipe, lat=None):
    lat = latents() if lat is None else lat
    with torch.no_grad():
        return pipe(PROMPTS, height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0,
                    latents=torch.from_numpy(lat.transpose(0, 3, 1, 2)), output_type="np").images


# -- adapter files made here -----------------------------------------------------------------------------------------


def layers(module, include=None):
    """(name, layer) of the Linear / Conv2d layers of a torch module (`include`: predicate on the name)."""
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and (include is None or include(n))]


def lora_pair(layer, rank, gen, std=0.15):
    """(down, up) in the kohya/PEFT layout: Linear (r, in) / (out, r); Conv (LoCon) (r, in, kh, kw) / (out, r, 1, 1)."""
    if isinstance(layer, torch.nn.Conv2d):
        down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=gen) * std
        up = torch.randn(layer.out_channels, rank, 1, 1, generator=gen) * std
    else:
        down = torch.randn(rank, layer.in_features, generator=gen) * std
        up = torch.randn(layer.out_features, rank, generator=gen) * std
    return down, up


def kohya_file(path, parts, seed=0, rank=4, alpha=2.0):
    """A kohya LoRA: parts = [(prefix, [(kohya module name, torch layer)])]; alpha None: 1..4 by module (diffusers
    applies per-module alphas of attention and text-encoder layers wrongly: its alpha_pattern keys keep the processor
    names; one alpha for all is what it reads right)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, named in parts:
        for i, (name, layer) in enumerate(named):
            down, up = lora_pair(layer, rank, gen)
            key = f"{prefix}{name}"
            sd[f"{key}.lora_down.weight"] = down
            sd[f"{key}.lora_up.weight"] = up
            sd[f"{key}.alpha"] = torch.tensor(alpha if alpha is not None else float(1 + i % 4))
    save_file(sd, str(path))
    return path


def joined(named):
    return [(n.replace(".", "_"), m) for n, m in named]


def sd1_kohya(folder, path, seed=0):
    ref = reference(folder, "sd1")
    unet = joined(layers(ref.unet))
    te = joined(layers(ref.text_encoder))
    return kohya_file(path, [("lora_unet_", unet), ("lora_te_", te)], seed=seed)


# -- parity with diffusers ---------------------------------------------------------------------------------------------


def test_kohya_sd1_matches_diffusers(sd1, folders, tmp_path):
    """Every Linear and Conv of the UNet (attention, feed-forward, proj_in/out 1x1 convs, LoCon 3x3 convs of the
    resnets, down/upsamplers, conv_in/out, time embedding) and of the text encoder."""
    path = sd1_kohya(folders, tmp_path / "kohya.safetensors")
    base = ours(sd1)
    sd1.load_lora_weights(path)
    try:
        got = ours(sd1)
    finally:
        sd1.unload_lora_weights()
    ref = reference(folders, "sd1")
    ref.load_lora_weights(str(path))
    want = theirs(ref)
    assert np.abs(got - base).max() > 0.05  # the adapter matters
    assert np.abs(got - want).max() <= TOL


def test_two_adapters_mixed_match_diffusers(sd1, folders, tmp_path):
    """Two kohya adapters (the second on the UNet's attention only) mixed with weights 0.7 and -0.5."""
    ref = reference(folders, "sd1")
    first = sd1_kohya(folders, tmp_path / "first.safetensors", seed=1)
    second = kohya_file(tmp_path / "second.safetensors",
                        [("lora_unet_", joined(layers(ref.unet, lambda n: ".attn" in n)))], seed=2, alpha=1.0)
    sd1.load_lora_weights(first, adapter_name="first")
    sd1.load_lora_weights(str(second), adapter_name="second")
    try:
        assert sd1.get_active_adapters() == ["second"]  # the one loaded last (diffusers' is layer by layer)
        assert sd1.get_list_adapters() == {"unet": ["first", "second"], "text_encoder": ["first"]}
        sd1.set_adapters(["first", "second"], adapter_weights=[0.7, -0.5])
        assert sd1.get_active_adapters() == ["first", "second"]
        got = ours(sd1)
    finally:
        sd1.unload_lora_weights()
    ref.load_lora_weights(str(first), adapter_name="first")
    ref.load_lora_weights(str(second), adapter_name="second")
    ref.set_adapters(["first", "second"], adapter_weights=[0.7, -0.5])
    want = theirs(ref)
    assert np.abs(got - want).max() <= TOL


def peft_adapter(module, targets, rank, alpha, seed, alpha_pattern=None):
    """Add a PEFT LoRA to a torch module with random weights; (its state dict, its LoraConfig as a dict)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from peft import inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, alpha_pattern=alpha_pattern or {},
                        init_lora_weights=False)
    inject_adapter_in_model(config, module)  # (transformers' add_adapter wants a newer peft)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    return get_peft_model_state_dict(module), config.to_dict()


def test_peft_format_matches_diffusers(sd1, folders, tmp_path):
    """A diffusers/PEFT file written by diffusers' save_lora_weights: lora_A/lora_B keys, alpha (and a per-module
    alpha pattern) from its lora_adapter_metadata."""
    maker = reference(folders, "sd1")
    unet_sd, unet_cfg = peft_adapter(
        maker.unet, ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                     "conv2", "time_emb_proj"], rank=4, alpha=8, seed=3, alpha_pattern={"to_k": 2})
    te_sd, te_cfg = peft_adapter(maker.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                                 rank=2, alpha=1, seed=4)
    folder = tmp_path / "peft"
    diffusers.StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd, unet_lora_adapter_metadata=unet_cfg,
        text_encoder_lora_adapter_metadata=te_cfg)
    sd1.load_lora_weights(folder)
    try:
        got = ours(sd1)
    finally:
        sd1.unload_lora_weights()
    ref = reference(folders, "sd1")
    ref.load_lora_weights(str(folder))
    want = theirs(ref)
    assert np.abs(got - want).max() <= TOL
    assert np.abs(got - ours(sd1)).max() > 0.05


RESNET_ORIGINAL = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                   "conv_shortcut": "skip_connection"}


def sgm_name(name: str, up_attention=(True, False), per_level=2) -> str:
    """A diffusers UNet module path in kohya's SDXL spelling (the original layout, "_"-joined), for the tiny SDXL
    UNet (layers_per_block 1: two entries per level)."""
    p = name.split(".")
    fixed = {"conv_in": "input_blocks_0_0", "conv_out": "out_2", "time_embedding.linear_1": "time_embed_0",
             "time_embedding.linear_2": "time_embed_2", "add_embedding.linear_1": "label_emb_0_0",
             "add_embedding.linear_2": "label_emb_0_2"}
    if name in fixed:
        return fixed[name]
    if p[0] == "mid_block":
        if p[1] == "attentions":
            return "middle_block_1_" + "_".join(p[3:])
        return f"middle_block_{2 * int(p[2])}_{RESNET_ORIGINAL[p[3]]}"
    level = int(p[1])
    if p[2] == "downsamplers":
        return f"input_blocks_{1 + level * per_level + per_level - 1}_0_op"
    if p[2] == "upsamplers":
        return f"output_blocks_{level * per_level + per_level - 1}_{2 if up_attention[level] else 1}_conv"
    i = (1 + level * per_level if p[0] == "down_blocks" else level * per_level) + int(p[3])
    where = "input_blocks" if p[0] == "down_blocks" else "output_blocks"
    if p[2] == "resnets":
        return f"{where}_{i}_0_{RESNET_ORIGINAL[p[4]]}"
    return f"{where}_{i}_1_" + "_".join(p[4:])


def test_kohya_sdxl_original_layout_matches_diffusers(sdxl, folders, tmp_path):
    """kohya SDXL names in the original input_blocks/middle_block/output_blocks layout, both text encoders."""
    ref = reference(folders, "sdxl")
    unet = [(sgm_name(n), m) for n, m in layers(ref.unet)]
    assert any(n.startswith("input_blocks_3_1_transformer_blocks_1") for n, _ in unet)
    path = kohya_file(tmp_path / "sdxl.safetensors", [
        ("lora_unet_", unet), ("lora_te1_", joined(layers(ref.text_encoder))),
        ("lora_te2_", joined(layers(ref.text_encoder_2, lambda n: n != "text_projection")))], seed=5)
    base = ours(sdxl)
    sdxl.load_lora_weights(path)
    try:
        assert sdxl.get_list_adapters() == {"unet": ["default_0"], "text_encoder": ["default_0"],
                                            "text_encoder_2": ["default_0"]}
        got = ours(sdxl)
    finally:
        sdxl.unload_lora_weights()
    ref.load_lora_weights(str(path))
    want = theirs(ref)
    assert np.abs(got - base).max() > 0.05
    assert np.abs(got - want).max() <= TOL


def test_unload_is_exact_and_nothing_recompiles(sd1, folders, tmp_path):
    """Loading, switching adapters and weights, disabling and unloading only change the weights passed to the
    compiled program: no new compile, and unloading gives the base weights (the same arrays) and images back."""
    first = sd1_kohya(folders, tmp_path / "a.safetensors", seed=6)
    second = sd1_kohya(folders, tmp_path / "b.safetensors", seed=7)
    base = ours(sd1)  # compiled here (or earlier in the module)
    state = {k: v for k, v in sd1.adapters().networks.items()}
    before = {k: jax_leaves(m) for k, m in state.items()}
    with CompileLog() as log:
        sd1.load_lora_weights(first, adapter_name="a")
        a = ours(sd1)
        sd1.load_lora_weights(second, adapter_name="b")
        b = ours(sd1)
        sd1.set_adapters(["a", "b"], [0.7, -0.5])
        mixed = ours(sd1)
        sd1.set_adapters("a", 0.3)
        a03 = ours(sd1)
        sd1.set_adapters(["a"], [{"unet": 1.0, "text_encoder": 0.0}])
        unet_only = ours(sd1)
        sd1.disable_lora()
        disabled = ours(sd1)
        sd1.enable_lora()
        again = ours(sd1)
        sd1.delete_adapters("a")
        assert sd1.get_list_adapters() == {"unet": ["b"], "text_encoder": ["b"]} and sd1.get_active_adapters() == []
        sd1.unload_lora_weights()
        after = ours(sd1)
        assert log.count == 0
        sd1(["x"], height=H, width=W, num_inference_steps=STEPS, output_type="latent")  # a new plan: the log sees it
    assert log.count == 1
    images = [a, b, mixed, a03, unet_only]
    assert all(np.abs(x - y).max() > 1e-2 for i, x in enumerate([base] + images) for y in images[i:] if x is not y)
    assert np.array_equal(disabled, base) and np.array_equal(again, unet_only) and np.array_equal(after, base)
    after_leaves = {k: jax_leaves(m) for k, m in state.items()}
    for k in before:
        assert all(x is y for x, y in zip(before[k], after_leaves[k])), k  # the original arrays themselves
    assert sd1.get_active_adapters() == [] and sd1.get_list_adapters() == {}


def jax_leaves(module):
    from flax import nnx

    return [v.get_value() for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param))]


def test_per_module_alpha_and_unprefixed_names(sd1, folders, tmp_path):
    """alpha / rank per module: a file with alphas 1..4 gives the images of one whose up weights carry the scale and
    have no alpha (scale 1)."""
    from safetensors.torch import load_file

    path = kohya_file(tmp_path / "alphas.safetensors", [("lora_unet_", joined(layers(reference(folders, "sd1").unet)))],
                      seed=8, alpha=None)
    sd = load_file(str(path))
    scaled = {}
    for key, value in sd.items():
        name, _, part = key.partition(".")
        if part == "lora_up.weight":
            scaled[key] = value * (sd[f"{name}.alpha"] / sd[f"{name}.lora_down.weight"].shape[0])
        elif part != "alpha":
            scaled[key] = value
    sd1.load_lora_weights(path)
    try:
        with_alpha = ours(sd1)
    finally:
        sd1.unload_lora_weights()
    sd1.load_lora_weights({k: v.numpy() for k, v in scaled.items()})
    try:
        prescaled = ours(sd1)
    finally:
        sd1.unload_lora_weights()
    assert np.abs(with_alpha - ours(sd1)).max() > 0.05
    assert np.abs(with_alpha - prescaled).max() <= 1e-5


@pytest.mark.parametrize("case,message", [
    ("not_lora", "not a LoRA/LyCORIS file"),
    ("dora", "DoRA (dora_scale) adapters are not supported"),
    ("peft_dora", "DoRA (lora_magnitude_vector)"),
    ("oft", "OFT adapters are not supported"),
    ("unknown_module", "2 modules match no layer of this pipeline: lora_unet_down_blocks_0_resnets_9_conv1, "
                       "lora_unet_down_blocks_7_resnets_0_conv1"),
    ("te2_on_sd1", "changes text_encoder_2, which this pipeline does not have"),
    ("wrong_shape", "adapter shapes do not fit the model"),
    ("missing_up", "missing lora_up.weight"),
    ("stray_key", "keys that belong to no network: model.diffusion_model.x"),
    ("pickle", "cannot read LoRA file"),
])
def test_bad_files_give_one_line_errors(sd1, tmp_path, case, message):
    down, up = torch.zeros(2, 32, 3, 3), torch.zeros(32, 2, 1, 1)
    lora = {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": down,
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": up}
    files = {
        "not_lora": {"model.diffusion_model.x": torch.zeros(2)},
        "dora": {**lora, "lora_unet_down_blocks_0_resnets_0_conv1.dora_scale": torch.zeros(1, 32, 1, 1)},
        "peft_dora": {"unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3),
                      "unet.conv_in.lora_B.weight": torch.zeros(32, 2, 1, 1),
                      "unet.conv_in.lora_magnitude_vector": torch.zeros(32)},
        "oft": {"lora_unet_down_blocks_0_resnets_0_conv1.oft_blocks": torch.zeros(4, 8, 8)},
        "unknown_module": {**lora, **{k.replace("blocks_0", "blocks_7"): v for k, v in lora.items()},
                           **{k.replace("resnets_0", "resnets_9"): v for k, v in lora.items()}},
        "te2_on_sd1": {k.replace("lora_unet_down_blocks_0_resnets_0_conv1", "lora_te2_text_model_encoder_layers_0_"
                                 "mlp_fc1"): v for k, v in lora.items()},
        "wrong_shape": {**lora, "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(64, 2, 1, 1)},
        "missing_up": {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": down},
        "stray_key": {**lora, "model.diffusion_model.x": torch.zeros(2)},
    }
    path = tmp_path / f"{case}.safetensors"
    if case == "pickle":
        import pickle

        path = tmp_path / "evil.pt"
        path.write_bytes(pickle.dumps({"a": 1}))
    else:
        save_file({k: v.clone() for k, v in files[case].items()}, str(path))
    leaves = jax_leaves(sd1.unet)
    with pytest.raises(ValueError) as e:
        sd1.load_lora_weights(path)
    text = str(e.value)
    assert message in text and "\n" not in text, text
    assert all(x is y for x, y in zip(leaves, jax_leaves(sd1.unet)))  # nothing changed
    assert sd1.get_list_adapters() == {}


# -- LyCORIS against its definition ------------------------------------------------------------------------------------


def lycoris_modules(gen, r=3):
    """(kohya module prefix + name, torch module path, {part: tensor}, reference delta) for LoHa, LoKr and Tucker
    LoCon on Linear and 3x3 Conv layers of the tiny SD1 UNet and its text encoder. The reference deltas follow the
    LyCORIS definitions (lycoris/functional/loha.py, lokr.py, general.py) as A1111 and ComfyUI apply them:
    LoHa (w1a w1b) * (w2a w2b) (Tucker: einsum('ijkl,jr,ip->prkl', t, wb, wa)), LoKr kron(w1, w2), Tucker LoCon
    einsum('mnkl,im,nj->ijkl', mid, up, down); times alpha / rank (LoKr without alpha: 1)."""
    def rnd(*shape, std=0.3):
        return torch.randn(*shape, generator=gen) * std

    def tucker(t, wb, wa):
        return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)

    out = []
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    # LoHa on a Linear (64 x 64)
    p = dict(hada_w1_a=rnd(64, r), hada_w1_b=rnd(r, 64), hada_w2_a=rnd(64, r), hada_w2_b=rnd(r, 64),
             alpha=torch.tensor(2.0))
    out.append(("lora_unet_", f"{attn}.to_q", p, (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
                * 2.0 / r))
    # LoHa on a 3x3 conv, factors flattened over in x kh x kw
    p = dict(hada_w1_a=rnd(32, r), hada_w1_b=rnd(r, 32 * 9), hada_w2_a=rnd(32, r), hada_w2_b=rnd(r, 32 * 9),
             alpha=torch.tensor(1.5))
    out.append(("lora_unet_", "down_blocks.0.resnets.0.conv1", p,
                ((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])).reshape(32, 32, 3, 3)
                * 1.5 / r))
    # LoHa with Tucker cores on a 3x3 conv (32 -> 64)
    p = dict(hada_t1=rnd(r, r, 3, 3), hada_w1_a=rnd(r, 64), hada_w1_b=rnd(r, 32), hada_t2=rnd(r, r, 3, 3),
             hada_w2_a=rnd(r, 64), hada_w2_b=rnd(r, 32), alpha=torch.tensor(1.0))
    out.append(("lora_unet_", "down_blocks.1.resnets.0.conv1", p,
                tucker(p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"]) * tucker(p["hada_t2"], p["hada_w2_b"],
                                                                               p["hada_w2_a"]) / r))
    # LoKr on a Linear: w1 full, w2 = w2a w2b (rank: w2b's)
    p = dict(lokr_w1=rnd(8, 8), lokr_w2_a=rnd(8, r), lokr_w2_b=rnd(r, 8), alpha=torch.tensor(2.0))
    out.append(("lora_unet_", f"{attn}.to_k", p, torch.kron(p["lokr_w1"], p["lokr_w2_a"] @ p["lokr_w2_b"]) * 2.0 / r))
    # LoKr on a 3x3 conv: w1 = w1a w1b (rank: w1b's), w2 full (8, 8, 3, 3)
    p = dict(lokr_w1_a=rnd(4, r), lokr_w1_b=rnd(r, 4), lokr_w2=rnd(8, 8, 3, 3), alpha=torch.tensor(1.0))
    out.append(("lora_unet_", "down_blocks.0.resnets.0.conv2", p,
                torch.kron((p["lokr_w1_a"] @ p["lokr_w1_b"])[:, :, None, None], p["lokr_w2"]) / r))
    # LoKr with a Tucker core on a 3x3 conv (96 -> 32)
    p = dict(lokr_w1=rnd(4, 8), lokr_t2=rnd(r, r, 3, 3), lokr_w2_a=rnd(r, 8), lokr_w2_b=rnd(r, 12),
             alpha=torch.tensor(3.0))
    w2 = torch.einsum("i j k l, i p, j r -> p r k l", p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    out.append(("lora_unet_", "up_blocks.1.resnets.0.conv1", p,
                torch.kron(p["lokr_w1"][:, :, None, None], w2.contiguous()) * 3.0 / r))
    # LoKr with both factors full and no alpha (scale 1) on the text encoder's fc1 (37 x 32; 37 is prime)
    p = dict(lokr_w1=rnd(1, 2), lokr_w2=rnd(37, 16, std=0.1))
    out.append(("lora_te_", "text_model.encoder.layers.0.mlp.fc1", p, torch.kron(p["lokr_w1"], p["lokr_w2"])))
    # LoCon with a Tucker core (lora_mid) on a 3x3 conv (64 -> 64)
    p = {"lora_down.weight": rnd(r, 64, 1, 1), "lora_mid.weight": rnd(r, r, 3, 3), "lora_up.weight": rnd(64, r, 1, 1),
         "alpha": torch.tensor(2.0)}
    out.append(("lora_unet_", "down_blocks.1.resnets.0.conv2", p,
                torch.einsum("m n k l, i m, n j -> i j k l", p["lora_mid.weight"], p["lora_up.weight"][:, :, 0, 0],
                             p["lora_down.weight"][:, :, 0, 0]) * 2.0 / r))
    return out


def test_lycoris_loha_lokr_match_their_definition(sd1, folders, tmp_path):
    """LoHa, LoKr (full, factored and Tucker parts) and Tucker LoCon, from a PyTorch `.pt` file (read without
    torch): sdjax's images equal diffusers' with the merged weights computed in PyTorch from the definition."""
    modules = lycoris_modules(torch.Generator().manual_seed(9))
    state = {f"{prefix}{name.replace('.', '_')}.{part}": t for prefix, name, parts, _ in modules
             for part, t in parts.items()}
    path = tmp_path / "lycoris.pt"
    torch.save(state, str(path))
    sd1.load_lora_weights(path, adapter_name="lycoris")
    try:
        got = ours(sd1)
    finally:
        sd1.unload_lora_weights()
    ref = reference(folders, "sd1")
    with torch.no_grad():
        for prefix, name, _, d in modules:
            network = ref.unet if prefix == "lora_unet_" else ref.text_encoder
            weight = network.get_submodule(name.removeprefix("text_model.") if not hasattr(network, "text_model")
                                           else name).weight
            assert weight.shape == d.shape, name
            weight += d
    want = theirs(ref)
    assert np.abs(got - ours(sd1)).max() > 0.05
    assert np.abs(got - want).max() <= TOL


# -- command line ------------------------------------------------------------------------------------------------------


def test_cli_lora_flag(sd1, folders, tmp_path, capsys):
    """`--lora FILE[:WEIGHT]` (repeatable) gives the library's images with set_adapters; PNG `Lora hashes` and the
    manifest record the adapters; a missing file or a bad weight is one line and exit code 2."""
    import hashlib

    from PIL import Image

    from sdjax import cli

    first = sd1_kohya(folders, tmp_path / "first.safetensors", seed=10)
    second = sd1_kohya(folders, tmp_path / "second.safetensors", seed=11)
    out = tmp_path / "out"
    common = ["txt2img", "--prompt", "a cat", "--ckpt", str(folders["sd1"]), "--n_samples", "1", "--n_iter", "1",
              "--H", "32", "--W", "32", "--ddim_steps", "2", "--scale", "5", "--skip_grid"]
    assert cli.main([*common, "--outdir", str(out), "--lora", f"{first}:0.7", "--lora", str(second)]) == 0
    png = Image.open(next((out / "samples").glob("*.png")))
    sd1.load_lora_weights(first, adapter_name="first")
    sd1.load_lora_weights(second, adapter_name="second")
    try:
        sd1.set_adapters(["first", "second"], [0.7, 1.0])
        want = sd1("a cat", height=32, width=32, num_inference_steps=2, guidance_scale=5.0, seed=42).images[0]
    finally:
        sd1.unload_lora_weights()
    assert np.abs(np.asarray(png, np.int16) - np.asarray(want, np.int16)).max() <= 1
    data = second.read_bytes()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    assert f'Lora hashes: "first: ' in png.text["parameters"] and f"second: {addnet}" in png.text["parameters"]
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert [(r["file"], r["weight"]) for r in record["loras"]] == [("first.safetensors", 0.7),
                                                                   ("second.safetensors", 1.0)]
    capsys.readouterr()
    for flag, message in ((str(tmp_path / "none.safetensors"), "no such file"), (f"{first}:abc", "must be a number"),
                          (str(tmp_path / "out" / "manifest.jsonl"), "cannot read LoRA file")):
        assert cli.main([*common, "--outdir", str(tmp_path / "bad"), "--lora", flag]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err


def test_old_diffusers_names_match_diffusers(sd1, folders, tmp_path):
    """The older diffusers names: `unet.<path>.processor.to_q_lora.down.weight`, `text_encoder.<path>.to_q_lora...`
    and `...mlp.fc1.lora_linear_layer.down.weight`."""
    ref = reference(folders, "sd1")
    gen = torch.Generator().manual_seed(12)
    proj = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    sd = {}
    for name, layer in layers(ref.unet, lambda n: ".attn" in n):
        head, _, tail = name.rpartition(".attn")
        attn, _, which = tail.partition(".")
        down, up = lora_pair(layer, 4, gen)
        key = f"unet.{head}.attn{attn}.processor.{proj[which]}"
        sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = down, up
    te_proj = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
    for name, layer in layers(ref.text_encoder):
        down, up = lora_pair(layer, 2, gen)
        head, _, last = name.rpartition(".")
        key = (f"text_encoder.{head}.{te_proj[last]}" if last in te_proj else f"text_encoder.{name}.lora_linear_layer")
        key = key.replace("text_encoder.encoder.", "text_encoder.text_model.encoder.")
        sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = down, up
    path = tmp_path / "old.safetensors"
    save_file(sd, str(path))
    sd1.load_lora_weights(path)
    try:
        got = ours(sd1)
    finally:
        sd1.unload_lora_weights()
    ref.load_lora_weights(str(path))
    want = theirs(ref)
    assert np.abs(got - ours(sd1)).max() > 0.05
    assert np.abs(got - want).max() <= TOL


def test_sdxl_refiner_takes_unet_and_text_encoder_2(tmp_path):
    """The refiner has text_encoder_2 only: a kohya SDXL file for its UNet and lora_te2_ changes exactly the named
    weights; one with lora_te1_ keys is refused in one line."""
    folder = build_sdxl(tmp_path / "refiner", refiner=True)
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(folder)
    ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    unet = [(sgm_name(n), m) for n, m in layers(ref.unet, lambda n: "attentions" in n or "resnets" in n)]
    te2 = joined(layers(ref.text_encoder_2))
    path = kohya_file(tmp_path / "refiner.safetensors", [("lora_unet_", unet), ("lora_te2_", te2)], seed=13)
    before = {k: jax_leaves(m) for k, m in (("unet", pipe.unet), ("text_encoder_2", pipe.text_encoder_2))}
    pipe.load_lora_weights(path)
    changed = {k: sum(x is not y for x, y in zip(v, jax_leaves(getattr(pipe, k)))) for k, v in before.items()}
    assert changed == {"unet": len(unet), "text_encoder_2": len(te2)}
    pipe.unload_lora_weights()
    te1 = kohya_file(tmp_path / "te1.safetensors", [("lora_te1_", te2[:1])])
    with pytest.raises(ValueError, match="changes text_encoder, which this pipeline does not have"):
        pipe.load_lora_weights(te1)


def test_fuse_then_unload_matches_diffusers(folders, tmp_path):
    """diffusers' fuse_lora(lora_scale) of two mixed adapters, then unload_lora_weights: the fused weights stay and
    the adapters go, in both libraries (a pipeline of its own: the fusion outlives the unload)."""
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(folders["sd1"])
    ref = reference(folders, "sd1")
    first = sd1_kohya(folders, tmp_path / "first.safetensors", seed=14)
    second = kohya_file(tmp_path / "second.safetensors",
                        [("lora_unet_", joined(layers(ref.unet, lambda n: ".attn" in n)))], seed=15, alpha=1.0)
    base = ours(pipe)
    for p in (pipe, ref):
        p.load_lora_weights(str(first), adapter_name="first")
        p.load_lora_weights(str(second), adapter_name="second")
        p.set_adapters(["first", "second"], adapter_weights=[0.7, -0.5])
    mixed = ours(pipe)
    pipe.fuse_lora(lora_scale=0.6)
    ref.fuse_lora(components=["unet", "text_encoder"], lora_scale=0.6)
    fused, want_fused = ours(pipe), theirs(ref)
    pipe.unload_lora_weights()
    ref.unload_lora_weights()
    kept, want_kept = ours(pipe), theirs(ref)
    assert pipe.get_list_adapters() == {} and pipe.get_active_adapters() == []
    assert min(np.abs(fused - base).max(), np.abs(fused - mixed).max()) > 0.02  # the scale matters, and the fuse
    assert np.abs(fused - want_fused).max() <= TOL and np.abs(kept - want_kept).max() <= TOL
    assert np.array_equal(fused, kept)
    ref.unfuse_lora(components=["unet", "text_encoder"])  # after unload nothing is left to unfuse, in both
    pipe.unfuse_lora()
    assert np.array_equal(ours(pipe), kept)


def test_unfuse_gives_the_weights_before_the_fuse(sd1, folders, tmp_path):
    """Fusing one of two active adapters into the UNet only: its UNet part is fused with weight x lora_scale (not
    added again while active), the rest stays an adapter; unfuse_lora gives the images before the fuse bit-exactly,
    and unloading then the original arrays; nothing recompiles the generation program."""
    first = sd1_kohya(folders, tmp_path / "a.safetensors", seed=16)
    second = sd1_kohya(folders, tmp_path / "b.safetensors", seed=17)
    base = ours(sd1)
    before = {k: jax_leaves(m) for k, m in sd1.adapters().networks.items()}
    with CompileLog() as log:
        sd1.load_lora_weights(first, adapter_name="a")
        sd1.load_lora_weights(second, adapter_name="b")
        sd1.set_adapters(["a", "b"], [0.7, -0.5])
        mixed = ours(sd1)
        sd1.fuse_lora(components=["unet"], lora_scale=0.6, adapter_names=["a"])
        fused = ours(sd1)
        assert sd1.get_active_adapters() == ["a", "b"]
        sd1.fuse_lora(components=["unet"], lora_scale=0.6, adapter_names=["a"])  # already fused: no change
        assert np.array_equal(ours(sd1), fused)
        sd1.set_adapters(["a", "b"], [{"unet": 0.42, "text_encoder": 0.7}, -0.5])
        sd1.unfuse_lora()
        as_weights = ours(sd1)
        sd1.set_adapters(["a", "b"], [0.7, -0.5])
        unfused = ours(sd1)
        sd1.unload_lora_weights()
        after = ours(sd1)
    assert log.count == 0
    assert np.abs(fused - mixed).max() > 0.02
    assert np.abs(fused - as_weights).max() <= 1e-5
    assert np.array_equal(unfused, mixed) and np.array_equal(after, base)
    for k, leaves in before.items():
        assert all(x is y for x, y in zip(leaves, jax_leaves(sd1.adapters().networks[k]))), k


def test_fuse_errors_change_nothing(sd1, folders, tmp_path):
    """Nothing active, a network the pipeline lacks, a bad scale, an unknown adapter and (safe_fusing) a fuse that
    gives non-finite weights: one-line ValueErrors, the weights untouched."""
    with pytest.raises(ValueError, match="no active adapter to fuse"):
        sd1.fuse_lora()
    path = sd1_kohya(folders, tmp_path / "a.safetensors", seed=18)
    from safetensors.numpy import load_file

    broken = load_file(str(path))
    key = next(k for k in broken if k.endswith("lora_up.weight"))
    broken[key] = np.full_like(broken[key], np.inf)
    sd1.load_lora_weights(path, adapter_name="a")
    sd1.load_lora_weights(broken, adapter_name="inf")
    try:
        sd1.set_adapters(["a"])
        state = {k: jax_leaves(m) for k, m in sd1.adapters().networks.items()}
        for kwargs, message in ((dict(components=["text_encoder_2"]), "'text_encoder_2' not in this pipeline"),
                                (dict(lora_scale=float("nan")), "lora_scale must be a finite number"),
                                (dict(adapter_names=["c"]), "'c' not loaded"),
                                (dict(adapter_names=["inf"], safe_fusing=True), "non-finite weights in 1 layer")):
            with pytest.raises(ValueError, match=message) as e:
                sd1.fuse_lora(**kwargs)
            assert "\n" not in str(e.value)
            now = {k: jax_leaves(m) for k, m in sd1.adapters().networks.items()}
            assert all(x is y for k in state for x, y in zip(state[k], now[k])), kwargs
    finally:
        sd1.unload_lora_weights()


def test_per_part_weights_match_diffusers(sd1, folders, tmp_path):
    """Text-encoder and UNet weights apart ({"unet": 1.2, "text_encoder": 0.5}, what <lora:NAME:0.5:1.2> asks for)
    and a plain one, against diffusers' set_adapters with the same weights."""
    first = sd1_kohya(folders, tmp_path / "first.safetensors", seed=19)
    second = sd1_kohya(folders, tmp_path / "second.safetensors", seed=20)
    weights = [{"unet": 1.2, "text_encoder": 0.5}, -0.5]
    sd1.load_lora_weights(first, adapter_name="first")
    sd1.load_lora_weights(second, adapter_name="second")
    try:
        sd1.set_adapters(["first", "second"], weights)
        got = ours(sd1)
        sd1.set_adapters(["first", "second"], [0.5, -0.5])
        te_weight_everywhere = ours(sd1)
    finally:
        sd1.unload_lora_weights()
    ref = reference(folders, "sd1")
    ref.load_lora_weights(str(first), adapter_name="first")
    ref.load_lora_weights(str(second), adapter_name="second")
    ref.set_adapters(["first", "second"], adapter_weights=weights)
    assert np.abs(got - te_weight_everywhere).max() > 0.02
    assert np.abs(got - theirs(ref)).max() <= TOL


def test_cli_lora_tags(sd1, folders, tmp_path, capsys):
    """A1111's `<lora:NAME:WEIGHT>` tags with --lora-dir: each prompt's images are the library's with set_adapters
    of the tags' weights (plus --lora's), the text encoder never sees the tags, prompts with other tags go in other
    batches; PNG parameters keep the prompt as written and list the prompt's LoRAs; bad tags fail before any image."""
    from PIL import Image

    from sdjax import cli

    loras = tmp_path / "loras"
    (loras / "sub").mkdir(parents=True)
    style = sd1_kohya(folders, loras / "sub" / "style.safetensors", seed=21)
    detail = sd1_kohya(folders, loras / "detail.safetensors", seed=22)
    prompts = ["a red circle <lora:style:0.7>", "a green square <lora:style:0.5:1.2>, <lora:detail:-0.5>",
               "a blue dot", "a cat <lora:style:0.7>"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    out = tmp_path / "out"
    common = ["txt2img", "--ckpt", str(folders["sd1"]), "--n_samples", "1", "--n_iter", "1", "--H", "32",
              "--W", "32", "--ddim_steps", "2", "--scale", "5", "--skip_grid"]
    assert cli.main([*common, "--from-file", str(tmp_path / "prompts.txt"), "--prompts-per-batch", "4",
                     "--outdir", str(out), "--lora-dir", str(loras)]) == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [prompts[0], prompts[3], prompts[1], prompts[2]]  # batched by tags
    sd1.load_lora_weights(style, adapter_name="style")
    sd1.load_lora_weights(detail, adapter_name="detail")
    wanted = {}
    try:
        for text, names, weights in (("a red circle ", ["style"], [0.7]), ("a cat ", ["style"], [0.7]),
                                     ("a green square , ", ["style", "detail"], [{"unet": 1.2, "text_encoder": 0.5},
                                                                                -0.5]),
                                     ("a blue dot", [], [])):
            sd1.set_adapters(names, weights)
            wanted[text] = sd1(text, height=32, width=32, num_inference_steps=2, guidance_scale=5.0, seed=42,
                               prompt_syntax="a1111").images[0]
    finally:
        sd1.unload_lora_weights()
    for r, text in zip(records, ("a red circle ", "a cat ", "a green square , ", "a blue dot")):
        png = Image.open(out / r["file"])
        assert np.abs(np.asarray(png, np.int16) - np.asarray(wanted[text], np.int16)).max() <= 1, text
        assert png.text["parameters"].startswith(r["prompt"] + "\n")
    assert [(x["file"], x["weight"], x.get("te_weight")) for x in records[2]["loras"]] == [
        ("style.safetensors", 1.2, 0.5), ("detail.safetensors", -0.5, None)]
    assert "loras" not in records[3] and "Lora hashes" not in Image.open(out / records[3]["file"]).text["parameters"]
    assert 'Lora hashes: "style: ' in Image.open(out / records[0]["file"]).text["parameters"]
    capsys.readouterr()
    for prompt, extra, message in (("a <lora:style:x>", ["--lora-dir", str(loras)], "the text-encoder weight must be"),
                                   ("a <lora:style>", [], "give --lora-dir DIR"),
                                   ("a <lora:missing:1>", ["--lora-dir", str(loras)], "<lora:missing>: no missing."),
                                   ("a <hypernet:h>", [], "hypernetworks are not supported")):
        bad = tmp_path / "bad"
        assert cli.main([*common, "--prompt", prompt, "--outdir", str(bad), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
        assert not list((bad / "samples").glob("*.png"))


def test_demo_lora_tags(sd1, folders, tmp_path, capsys):
    """The demo's generate with --lora-dir's PromptLoras: a tagged prompt gives the library's image with the tag's
    LoRA, its PNG parameters keep the tag and list the LoRA; a bad tag is the request's ValueError;
    `sdjax demo --lora-dir` of a missing folder is one line before any model loads."""
    pytest.importorskip("gradio")
    from PIL import Image

    from sdjax import cli
    from sdjax.app import PromptLoras
    from sdjax.demo import generate

    style = sd1_kohya(folders, tmp_path / "style.safetensors", seed=23)
    kw = dict(guidance_scale=5.0, width=32, height=32, steps=2, sampler="ddim", seed=3, n_candidates=1)
    try:
        loras = PromptLoras(sd1, (), [tmp_path])
        got = generate(sd1, "a cat <lora:style:0.6>", outdir=tmp_path / "a", loras=loras, **kw)[0]
        plain = generate(sd1, "a cat ", outdir=tmp_path / "b", loras=loras, **kw)[0]
        with pytest.raises(ValueError, match="<lora:nothing>: no nothing"):
            generate(sd1, "a cat <lora:nothing>", outdir=tmp_path / "c", loras=loras, **kw)
        sd1.set_adapters(["style"], [0.6])
        want = sd1("a cat ", height=32, width=32, num_inference_steps=2, guidance_scale=5.0, seed=3).images[0]
    finally:
        sd1.unload_lora_weights()
    base = sd1("a cat ", height=32, width=32, num_inference_steps=2, guidance_scale=5.0, seed=3).images[0]
    image = np.asarray(Image.open(got.path), np.int16)
    assert np.abs(image - np.asarray(want, np.int16)).max() <= 1
    assert np.abs(np.asarray(Image.open(plain.path), np.int16) - np.asarray(base, np.int16)).max() <= 1
    assert np.abs(image - np.asarray(base, np.int16)).max() > 5
    assert got.parameters.startswith("a cat <lora:style:0.6>\n") and 'Lora hashes: "style: ' in got.parameters
    assert "Lora hashes" not in plain.parameters
    capsys.readouterr()
    assert cli.main(["demo", "--ckpt", str(tmp_path / "no-model"), "--lora-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--lora-dir" in err and "no such folder" in err and "\n" not in err


def test_sdxl_refiner_lora_images_match_diffusers(tmp_path, monkeypatch):
    """A kohya file for the refiner's UNet (original layout) and text_encoder_2, in an img2img call: diffusers'
    StableDiffusionXLImg2ImgPipeline with the same file gives the same images."""
    from sdjax.pipelines import noise

    from pipeline_fixtures import patch_noise, pil_image, sdjax_noise, smooth_image

    folder = build_sdxl(tmp_path / "refiner", refiner=True, seed=2)
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(folder)
    ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folder, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler("ddim", ref)
    unet = [(sgm_name(n), m) for n, m in layers(ref.unet)]
    te2 = joined(layers(ref.text_encoder_2, lambda n: n != "text_projection"))
    path = kohya_file(tmp_path / "refiner.safetensors", [("lora_unet_", unet), ("lora_te2_", te2)], seed=24)
    kw = dict(image=[pil_image(smooth_image(H, W, 0)), pil_image(smooth_image(H, W, 1))], strength=0.6,
              num_inference_steps=STEPS, guidance_scale=6.0, output_type="np", aesthetic_score=7.0)
    base = pipe(PROMPTS, sampler="ddim", **kw).images
    pipe.load_lora_weights(path)
    got = pipe(PROMPTS, sampler="ddim", **kw).images
    ref.load_lora_weights(str(path))
    patch_noise(monkeypatch, [sdjax_noise(2, LATENT, noise.STREAM_IMAGE_LATENTS), sdjax_noise(2, LATENT)])
    with torch.no_grad():
        want = ref(PROMPTS, **kw).images
    assert np.abs(got - base).max() > 0.05
    assert np.abs(got - want).max() <= TOL


def test_x4_upscaler_lora_images_match_diffusers(tmp_path, monkeypatch):
    """A kohya file for every Linear and Conv of the x4 upscaler's UNet and its text encoder: diffusers'
    StableDiffusionUpscalePipeline with the same file gives the same images (same latents and low-res noise)."""
    from pipeline_fixtures import build_upscaler, nchw, patch_noise, pil_image, smooth_image

    folder = build_upscaler(tmp_path / "x4", seed=1)
    pipe = sdjax.StableDiffusionUpscalePipeline.from_pretrained(folder)
    ref = diffusers.StableDiffusionUpscalePipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler("ddim", ref)
    path = kohya_file(tmp_path / "x4.safetensors", [("lora_unet_", joined(layers(ref.unet))),
                                                   ("lora_te_", joined(layers(ref.text_encoder)))], seed=25)
    h, w = 16, 24
    low = [pil_image(smooth_image(h, w, 0)), pil_image(smooth_image(h, w, 3))]
    lat = np.random.default_rng(9).standard_normal((2, h, w, 4)).astype(np.float32)
    low_noise = np.random.default_rng(10).standard_normal((2, h, w, 3)).astype(np.float32)
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, noise_level=30, output_type="np")
    base = pipe(PROMPTS, low, sampler="ddim", latents=lat, low_res_noise=low_noise, **kw).images
    pipe.load_lora_weights(path)
    got = pipe(PROMPTS, low, sampler="ddim", latents=lat, low_res_noise=low_noise, **kw).images
    ref.load_lora_weights(str(path))
    patch_noise(monkeypatch, [low_noise])
    with torch.no_grad():
        want = ref(PROMPTS, low, latents=nchw(lat), **kw).images
    assert np.abs(got - base).max() > 0.05
    assert np.abs(got - want).max() <= TOL
