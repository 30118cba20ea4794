"""Checkpoints: the two official safetensors layouts, the Hub download, and calibrated random weights.

Layouts (detected from the keys):
- ``moshi``: ``tokenizer-e351c8d8-checkpoint125.safetensors`` (keys such as ``encoder.model.0.conv.conv.weight``,
  fused ``self_attn.in_proj_weight``, ``quantizer.rvq_rest.vq.layers.3._codebook.embedding_sum``).
- ``transformers``: ``kyutai/mimi`` ``model.safetensors`` (``encoder.layers.0.conv.weight``, separate
  ``q_proj``/``k_proj``/``v_proj`` whose q and k rows were permuted for rotate-half RoPE; undone here).

Each of our parameter names maps to one name per layout; the reverse lookup gives strict loading with errors
that name the missing, unexpected or mis-shaped keys. Only safetensors is read, never pickle.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import MimiConfig
from .model import MimiModel
from .seanet import CausalConvTranspose1d

DEFAULT_REPO = "kyutai/mimi"
HF_FILENAME = "model.safetensors"
MOSHI_FILENAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
UNTRAINED_KEY = "mimi_tokenize.untrained"  # safetensors metadata key of generated random weights ("true")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unknown layout, missing/extra keys, wrong shapes, bad source."""


# --- key names -------------------------------------------------------------------------------------------

_MOSHI_RULES = [  # (our key pattern, moshi replacement), applied in order
    (r"^(encoder|decoder)\.model\.(\d+)\.block\.(\d)\.", r"\1.model.\2.block.\3.conv.conv."),
    (r"^(encoder|decoder)\.model\.(\d+)\.(weight|bias)$", r"\1.model.\2.{conv}.\3"),
    (r"^(encoder|decoder)_transformer\.layers\.", r"\1_transformer.transformer.layers."),
    (r"\.attn\.in_proj\.weight$", ".self_attn.in_proj_weight"),
    (r"\.attn\.out_proj\.weight$", ".self_attn.out_proj.weight"),
    (r"\.layer_scale_(\d)$", r".layer_scale_\1.scale"),
    (r"^downsample\.weight$", "downsample.conv.conv.conv.weight"),
    (r"^upsample\.weight$", "upsample.convtr.convtr.convtr.weight"),
    (r"^quantizer\.semantic\.", "quantizer.rvq_first."),
    (r"^quantizer\.acoustic\.", "quantizer.rvq_rest."),
    (r"\.codebooks\.(\d+)\.initialized$", r".vq.layers.\1._codebook._initialized"),
    (r"\.codebooks\.(\d+)\.", r".vq.layers.\1._codebook."),
]

_HF_RULES = [
    (r"^(encoder|decoder)\.model\.(\d+)\.block\.(\d)\.", r"\1.layers.\2.block.\3.conv."),
    (r"^(encoder|decoder)\.model\.(\d+)\.(weight|bias)$", r"\1.layers.\2.conv.\3"),
    (r"\.norm1\.", ".input_layernorm."),
    (r"\.norm2\.", ".post_attention_layernorm."),
    (r"\.attn\.out_proj\.", ".self_attn.o_proj."),
    (r"\.linear1\.", ".mlp.fc1."),
    (r"\.linear2\.", ".mlp.fc2."),
    (r"\.layer_scale_1$", ".self_attn_layer_scale.scale"),
    (r"\.layer_scale_2$", ".mlp_layer_scale.scale"),
    (r"^(downsample|upsample)\.weight$", r"\1.conv.weight"),
    (r"^quantizer\.semantic\.", "quantizer.semantic_residual_vector_quantizer."),
    (r"^quantizer\.acoustic\.", "quantizer.acoustic_residual_vector_quantizer."),
    (r"\.codebooks\.(\d+)\.embedding_sum$", r".layers.\1.codebook.embed_sum"),
    (r"\.codebooks\.(\d+)\.", r".layers.\1.codebook."),
]
_QKV = ("q_proj", "k_proj", "v_proj")


def layout_name(key: str, layout: str, transposed: bool = False) -> str:
    """The name of our key ``key`` in ``layout``; ``transposed`` for a transposed conv's weight/bias.

    In the transformers layout the fused in-projection maps to three keys, joined by commas.
    """
    if layout == "moshi":
        for pattern, repl in _MOSHI_RULES:
            key = re.sub(pattern, repl, key)
        return key.replace("{conv}", "convtr.convtr" if transposed else "conv.conv")
    if layout == "transformers":
        if key.endswith(".attn.in_proj.weight"):
            return ",".join(layout_name(key.replace("attn.in_proj", f"self_attn.{p}"), layout) for p in _QKV)
        for pattern, repl in _HF_RULES:
            key = re.sub(pattern, repl, key)
        return key
    raise ValueError(f"unknown layout {layout!r}")


def layout_names(model: MimiModel, layout: str) -> dict[str, str]:
    """Our state-dict key → its name in ``layout``, for every tensor of ``model``."""
    transposed = {f"{name}.{p}" for name, mod in model.named_modules() if isinstance(mod, CausalConvTranspose1d)
                  for p in ("weight", "bias")}
    return {key: layout_name(key, layout, key in transposed) for key in model.state_dict()}


def _rope_permutation(w: torch.Tensor, num_heads: int, inverse: bool) -> torch.Tensor:
    # interleaved pairs (2j, 2j+1) per head  <->  half-split (j, j + D/2), as transformers' converter does
    rows, cols = w.shape
    d = rows // num_heads
    if inverse:
        return w.view(num_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)
    return w.view(num_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def to_layout(state: dict[str, torch.Tensor], model: MimiModel, layout: str) -> dict[str, torch.Tensor]:
    """Convert our state dict to the key names (and q/k row order) of an official layout."""
    names, heads, out = layout_names(model, layout), model.config.num_heads, {}
    for key, tensor in state.items():
        if layout == "transformers" and key.endswith(".attn.in_proj.weight"):
            for name, part, permute in zip(names[key].split(","), tensor.chunk(3), (True, True, False)):
                out[name] = (_rope_permutation(part, heads, inverse=False) if permute else part).contiguous()
        else:
            out[names[key]] = tensor.contiguous()
    return out


def from_layout(tensors: dict[str, torch.Tensor], model: MimiModel, layout: str) -> dict[str, torch.Tensor]:
    """Map a file's tensors to our state dict; errors name every missing, unexpected or mis-shaped key."""
    names, heads, state = layout_names(model, layout), model.config.num_heads, {}
    expected = model.state_dict()
    missing, problems, used = [], [], set()
    for key, name in names.items():
        parts = name.split(",")
        absent = [p for p in parts if p not in tensors]
        if absent:
            missing += absent
            continue
        used.update(parts)
        if len(parts) == 3:  # transformers q, k, v
            q, k, v = (tensors[p] for p in parts)
            tensor = torch.cat([_rope_permutation(q, heads, True), _rope_permutation(k, heads, True), v])
        else:
            tensor = tensors[parts[0]]
        if tuple(tensor.shape) != tuple(expected[key].shape):
            problems.append(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
        state[key] = tensor
    extra = sorted(set(tensors) - used)
    errors = ([f"missing keys: {missing[:10]}{' …' if len(missing) > 10 else ''} ({len(missing)} in all)"]
              if missing else [])
    errors += [f"unexpected keys: {extra[:10]}{' …' if len(extra) > 10 else ''} ({len(extra)} in all)"] if extra else []
    errors += [f"wrong shapes: {problems}"] if problems else []
    if errors:
        raise CheckpointError(f"checkpoint does not match the Mimi {layout} layout: " + "; ".join(errors))
    return state


def detect_layout(keys) -> str:
    keys = set(keys)
    if any(k.startswith("encoder.model.") for k in keys):
        return "moshi"
    if any(k.startswith("encoder.layers.") for k in keys):
        return "transformers"
    raise CheckpointError("unrecognised checkpoint: expected Mimi keys such as 'encoder.model.0.conv.conv.weight' "
                          f"(moshi) or 'encoder.layers.0.conv.weight' (kyutai/mimi); got e.g. {sorted(keys)[:5]}")


# --- config ----------------------------------------------------------------------------------------------

def infer_config(tensors: dict[str, torch.Tensor], layout: str, hf_config: dict | None = None) -> MimiConfig:
    """Read the architecture off the tensor shapes (plus heads/window/RoPE base from a config.json if given)."""
    def name(key: str) -> str:
        return layout_name(key, layout)

    def shape(key: str) -> tuple[int, ...]:
        if name(key) not in tensors:
            raise CheckpointError(f"checkpoint lacks {name(key)!r}; cannot infer the Mimi architecture")
        return tuple(tensors[name(key)].shape)

    def count(pattern: str) -> int:
        n = 0
        while name(pattern.format(n)) in tensors:
            n += 1
        return n

    n_filters, _, kernel = shape("encoder.model.0.weight")
    ratios, idx = [], 3
    while name(f"encoder.model.{idx}.weight") in tensors and name(f"encoder.model.{idx - 2}.block.1.weight") in tensors:
        ratios.append(shape(f"encoder.model.{idx}.weight")[2] // 2)
        idx += 3
    dimension, _, last_kernel = shape(f"encoder.model.{idx - 1}.weight")
    hidden, _, res_kernel = shape("encoder.model.1.block.1.weight")
    ff_key = "encoder_transformer.layers.{}.linear1.weight"
    num_layers = count(ff_key)
    sem_key, aco_key = "quantizer.semantic.codebooks.{}.embedding_sum", "quantizer.acoustic.codebooks.{}.embedding_sum"
    n_sem, n_aco = count(sem_key), count(aco_key)
    bins, codebook_dim = shape(sem_key.format(0))
    hf = hf_config or {}
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10_000.0
    return MimiConfig(
        dimension=dimension, n_filters=n_filters, ratios=tuple(reversed(ratios)), kernel_size=kernel,
        residual_kernel_size=res_kernel, last_kernel_size=last_kernel, compress=n_filters // hidden,
        num_layers=num_layers, num_heads=hf.get("num_attention_heads", max(1, dimension // 64)),
        dim_feedforward=shape(ff_key.format(0))[0], context=hf.get("sliding_window") or 250,
        max_period=float(rope), n_q=n_sem + n_aco, n_q_semantic=n_sem, bins=bins, codebook_dim=codebook_dim,
        sample_rate=hf.get("sampling_rate", 24_000),
    )


def hf_config_dict(cfg: MimiConfig) -> dict:
    """config.json in the transformers MimiConfig format (what kyutai/mimi ships)."""
    return {
        "architectures": ["MimiModel"], "model_type": "mimi", "sampling_rate": cfg.sample_rate,
        "frame_rate": cfg.frame_rate, "audio_channels": 1, "hidden_size": cfg.dimension,
        "num_filters": cfg.n_filters, "num_residual_layers": 1, "upsampling_ratios": list(cfg.ratios),
        "kernel_size": cfg.kernel_size, "last_kernel_size": cfg.last_kernel_size,
        "residual_kernel_size": cfg.residual_kernel_size, "dilation_growth_rate": 2, "use_causal_conv": True,
        "pad_mode": "constant", "compress": cfg.compress, "trim_right_ratio": 1.0, "codebook_size": cfg.bins,
        "codebook_dim": cfg.codebook_dim, "num_quantizers": cfg.n_q, "use_conv_shortcut": False,
        "vector_quantization_hidden_dimension": cfg.codebook_dim, "num_semantic_quantizers": cfg.n_q_semantic,
        "upsample_groups": cfg.dimension, "num_hidden_layers": cfg.num_layers,
        "intermediate_size": cfg.dim_feedforward, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads, "head_dim": cfg.head_dim, "hidden_act": "gelu",
        "max_position_embeddings": 8000, "sliding_window": cfg.context, "rope_theta": cfg.max_period,
        "norm_eps": cfg.norm_eps, "layer_scale_initial_scale": 0.01, "attention_bias": False, "use_cache": False,
        "torch_dtype": "float32",
    }


# --- files and sources -----------------------------------------------------------------------------------

def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def _pick_in_folder(folder: Path) -> Path:
    for candidate in (HF_FILENAME, MOSHI_FILENAME):
        if (folder / candidate).is_file():
            return folder / candidate
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise CheckpointError(f"{folder}: expected {HF_FILENAME} or {MOSHI_FILENAME} (or exactly one .safetensors "
                          f"file), found {[p.name for p in found]}")


def _hub_unreachable() -> Exception | None:
    """The error of one quick request to the Hub endpoint (no retries), or None if it answered at all.

    huggingface_hub retries connection errors 5 times with backoff (~25 s); without a network this check lets
    the caller fall back to the cache, or fail with its message, at once. The timeout is HF_HUB_ETAG_TIMEOUT.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return None  # huggingface_hub itself answers from the cache or raises at once
    try:
        get_session().head(constants.ENDPOINT, timeout=float(getattr(constants, "HF_HUB_ETAG_TIMEOUT", 10)))
    except Exception as exc:  # DNS, refused, timeout, proxy, TLS
        return exc
    return None


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download, list_repo_files

    try:
        if (unreachable := _hub_unreachable()) is not None:
            raise unreachable
        files = set(list_repo_files(repo_id, revision=revision))
        name = HF_FILENAME if HF_FILENAME in files else MOSHI_FILENAME if MOSHI_FILENAME in files else None
        if name is None:
            raise CheckpointError(f"Hub repo {repo_id} has neither {HF_FILENAME} nor {MOSHI_FILENAME}")
        path = Path(hf_hub_download(repo_id, name, revision=revision))
        if "config.json" in files:
            hf_hub_download(repo_id, "config.json", revision=revision)
        return path
    except CheckpointError:
        raise
    except Exception as exc:  # offline, unknown repo, auth: try the local cache before giving up
        for name in (HF_FILENAME, MOSHI_FILENAME):
            try:
                return Path(hf_hub_download(repo_id, name, revision=revision, local_files_only=True))
            except Exception:
                continue
        raise CheckpointError(
            f"could not fetch Mimi weights {repo_id!r} from the Hugging Face Hub and nothing is cached "
            f"({type(exc).__name__}: {str(exc)[:200]}). Download them where the Hub is reachable "
            f"(`hf download {repo_id} {HF_FILENAME} config.json --local-dir mimi-weights`), then pass the folder "
            f"or the .safetensors file: load_mimi('mimi-weights') or `mimi-tokenize run --model mimi-weights`."
        ) from exc


def resolve_source(source: str | Path, revision: str | None = None) -> Path:
    """A local .safetensors file, a local folder, or a Hub repo id → the local checkpoint file."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in (".safetensors", ".sft", ".sfts"):
            raise CheckpointError(f"{path}: only safetensors checkpoints are read (never pickle)")
        return path
    if path.is_dir():
        return _pick_in_folder(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not str(source).startswith((".", "/")):
        return _download(str(source), revision)
    raise CheckpointError(f"{source!r} is neither a local file or folder nor a Hub repo id (org/name)")


def load_mimi(source: str | Path = DEFAULT_REPO, *, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, revision: str | None = None) -> MimiModel:
    """Load Mimi from a Hub repo id, a local folder or a local .safetensors file (either official layout).

    ``dtype`` (float16, bfloat16) casts the convolutions and transformers. The first convolution stays float32, so
    the waveform is never cast to 16 bits (float16 keeps 11 of a 16-bit sample's bits, and overflows past 65504),
    and so does the split RVQ (its projections and codebooks) with the nearest-code search."""
    path = resolve_source(source, revision)
    tensors = read_safetensors(path)
    layout = detect_layout(tensors)
    config_json = path.parent / "config.json"
    hf_config = json.loads(config_json.read_text()) if config_json.is_file() else None
    model = MimiModel(infer_config(tensors, layout, hf_config)).to(dtype=dtype)
    # float32 whatever the dtype, set before loading so that no weight is rounded twice: the codebooks (small
    # cluster_usage / embedding_sum values underflow in 16 bits) and the first convolution (it takes the waveform)
    model.quantizer.float()
    model.encoder.model[0].float()
    model.load_state_dict(from_layout(tensors, model, layout), strict=True)
    model.source, model.revision, model.weights_sha256 = str(source), revision, sha256_file(path)
    return model.to(device=device).eval()


# --- random weights (tests, benchmarks, the offline demo) ----------------------------------------------

def random_state_dict(cfg: MimiConfig = MimiConfig(), seed: int = 0) -> dict[str, torch.Tensor]:
    """Random but non-degenerate weights: scaled convs and projections, randomised norms and layer scales, and
    codebooks calibrated level by level on the model's own latents, so that every level emits varied codes."""
    gen = torch.Generator().manual_seed(seed)
    model = MimiModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale_1") or name.endswith("layer_scale_2"):
                p.copy_(0.05 + 0.25 * torch.rand(p.shape, generator=gen))
            elif ".norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:  # conv biases
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if "upsample" not in name else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
        _calibrate_codebooks(model, gen)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _calibrate_codebooks(model: MimiModel, gen: torch.Generator) -> None:
    t = torch.arange(8 * model.frame_size) / model.sample_rate
    wav = (0.3 * torch.sin(2 * torch.pi * 220 * t * (1 + t)) + 0.1 * torch.randn(t.shape, generator=gen))[None, None]
    latent = model._latent(wav.view(1, -1, 1), {})
    for rvq in (model.quantizer.semantic, model.quantizer.acoustic):
        residual = torch.nn.functional.linear(latent, rvq.input_proj.weight[..., 0]).flatten(0, 1)
        for book in rvq.codebooks:
            mean, std = residual.mean(0), residual.std(0) + 1e-6
            usage = 0.5 + 1.5 * torch.rand(book.cluster_usage.shape, generator=gen)
            emb = mean + std * torch.randn(book.embedding_sum.shape, generator=gen)
            book.embedding_sum.copy_(emb * usage[:, None])
            book.cluster_usage.copy_(usage)
            book.initialized.fill_(1.0)
            residual = residual - book.embedding[torch.cdist(residual, book.embedding).argmin(-1)]


def save_checkpoint(state: dict[str, torch.Tensor], path: str | Path, layout: str = "moshi",
                    cfg: MimiConfig = MimiConfig(), *, untrained: bool = False) -> Path:
    """Write our state dict in an official layout. ``moshi``: a .safetensors file (``path``);
    ``transformers``: a folder (``path``) with model.safetensors and config.json, as kyutai/mimi ships.
    ``untrained`` labels the weights as generated in the file's metadata (:data:`UNTRAINED_KEY`)."""
    model = MimiModel(cfg)
    tensors = to_layout(state, model, layout)
    metadata = {UNTRAINED_KEY: "true"} if untrained else {}
    path = Path(path)
    if layout == "transformers":
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2))
        path, metadata = path / HF_FILENAME, {"format": "pt", **metadata}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata or None)
    return path


def write_random_checkpoint(path: str | Path, cfg: MimiConfig = MimiConfig(), *, seed: int = 0,
                            layout: str = "moshi") -> Path:
    """Random calibrated weights saved in an official layout (see `random_state_dict`), labelled untrained."""
    return save_checkpoint(random_state_dict(cfg, seed), path, layout, cfg, untrained=True)


def is_untrained(path: str | Path) -> bool:
    """Whether the safetensors file ``path`` holds generated random weights (:func:`write_random_checkpoint`)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(UNTRAINED_KEY) == "true"
    except Exception:  # unreadable files are reported by the loader
        return False
