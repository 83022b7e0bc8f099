"""ClipModule: two towers, projection heads, optional variance heads, and an injected loss family.

The loss is built from a registered name (`model.loss`) and its options (`model.loss_args`), so an
ablation cell swaps it with one line of YAML. The module only builds what the loss asks for in its
`needs` (variance heads, region/word features), so the InfoNCE baseline carries no unused parameters.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_clip.dedup import first_occurrences, item_ids
from lightning_clip.losses import build_loss
from lightning_clip.losses._inputs import NonFiniteError
from lightning_clip.models import ImageTower, ProjectionHead, TextTower, VarianceHead
from lightning_clip.outputs import Embeddings
from lightning_clip.teacher import TeacherHolder, load_teacher


def logging_step(trainer) -> bool:
    """Whether this training step's values are worth logging: the logger writes them (Lightning's rule,
    every `log_every_n_steps`), or it is the last step of a `max_steps` run, whose values are the run's
    final metrics (`callback_metrics`) even when the logger does not write that step. Training values are
    logged on_step only, so a value logged on another step is never seen. True outside a trainer."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None or bool(getattr(connector, "should_update_logs", True)):
        return True
    max_steps = getattr(trainer, "max_steps", -1)
    return max_steps is not None and max_steps > 0 and trainer.global_step + 1 >= max_steps


class ClipModule(L.LightningModule):
    # running sum and count behind `train/false_negatives` (whole run so far; carried in the checkpoint,
    # so a resumed run reports the mean over every batch, as an uninterrupted one does)
    _false_negative_sum: float = 0.0
    _false_negative_batches: int = 0

    def __init__(
        self,
        loss: str = "infonce",
        loss_args: Optional[dict[str, Any]] = None,
        image_model: str = "test_vit",
        image_pretrained: bool = False,
        image_model_args: Optional[dict[str, Any]] = None,
        image_size: Optional[int] = 64,
        channels_last: bool = True,
        image_autocast: Optional[str] = None,
        text_model: Optional[str] = None,
        text_config: Optional[dict[str, Any]] = None,
        text_pooling: str = "mean",
        vocab_size: int = 8000,
        pad_token_id: int = 0,
        embed_dim: int = 128,
        head: str = "linear",
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.0,
        negatives_from: int = 1,
        teacher: Optional[str] = None,
    ):
        """
        Args:
            loss: registered loss family (see `lightning_clip.losses.LOSSES`).
            loss_args: options of that family's module (e.g. `mode`, `label_smoothing`).
            image_model: a timm model name; `test_vit`/`test_resnet` are tiny and need no download.
            image_pretrained: load timm's pretrained weights (needs the hub).
            image_model_args: extra keyword arguments for `timm.create_model` (e.g. `patch_size`).
            image_size: input resolution (linked from `data.image_size`); ViTs need it at build time.
            channels_last: run the image tower in NHWC memory layout (faster convolutions on CPU and GPU).
            image_autocast: `bf16` runs the image tower alone under bf16 autocast (outputs cast back to
                float32), whatever `trainer.precision` is; null follows the trainer.
            text_model: a transformers name or path; empty builds a small BERT from `text_config`.
            text_config: `BertConfig` overrides for the offline text tower.
            text_pooling: `mean` over real tokens or the `cls` token.
            vocab_size, pad_token_id: linked from the data module's tokenizer.
            embed_dim: size of the shared embedding space.
            head: `linear` (CLIP) or `mlp` (the tutorial's projection head).
            lr, weight_decay, betas: AdamW; no decay on biases, norms, embeddings and the loss' scale/bias.
            warmup_steps, min_lr_ratio: linear warmup then cosine decay to `min_lr_ratio * lr`.
            negatives_from: compute the loss over this many micro-batches at once (GradCache): their
                embeddings are cached without graph, the loss is taken over all k*B pairs, then each
                micro-batch's forward is replayed (same RNG state, so dropout matches) to back-propagate.
                Unlike `accumulate_grad_batches`, this adds negatives. One optimizer step per k batches.
            teacher: a ClipModule checkpoint or run folder, loaded frozen for a loss that needs a teacher
                (`soft_targets` with `targets: teacher`); kept out of this module's optimizer and checkpoint.
        """
        super().__init__()
        self.save_hyperparameters()
        if negatives_from < 1:
            raise ValueError(f"model.negatives_from must be >= 1, got {negatives_from}")
        if not lr > 0:  # AdamW refuses a negative rate; zero would train nothing without a word
            raise ValueError(f"model.lr={lr} must be > 0 (a zero learning rate leaves the model as initialised)")
        # GradCache needs control over backward and the optimizer step
        self.automatic_optimization = negatives_from == 1
        self._cache: list[tuple[dict, tuple]] = []
        self.loss = build_loss(loss, **(loss_args or {}))
        needs = self.loss.needs
        self._teacher: Optional[TeacherHolder] = None
        if ("teacher" in needs) != bool(teacher):
            raise ValueError(f"model.teacher={teacher!r}: model.loss {loss!r} with loss_args {loss_args or {}} "
                             + ("takes its targets from a frozen teacher; set model.teacher to a ClipModule "
                                "checkpoint or run folder" if not teacher else "uses no teacher; remove it"))
        if teacher:
            self._teacher = TeacherHolder(load_teacher(type(self), teacher, self.hparams))
        self.image_tower = ImageTower(image_model, pretrained=image_pretrained, image_size=image_size,
                                      channels_last=channels_last, autocast=image_autocast,
                                      **(image_model_args or {}))
        self.text_tower = TextTower(text_model, text_config, vocab_size=vocab_size, pad_token_id=pad_token_id,
                                    pooling=text_pooling)
        self.image_head = ProjectionHead(self.image_tower.num_features, embed_dim, head)
        self.text_head = ProjectionHead(self.text_tower.num_features, embed_dim, head)
        self.with_variance = bool({"image_ln_std", "text_ln_std"} & needs)
        if self.with_variance:
            self.image_var = VarianceHead(self.image_tower.num_features)
            self.text_var = VarianceHead(self.text_tower.num_features)
        self.with_local = bool({"regions", "words"} & needs)
        if self.with_local:
            # separate heads: local features need not live where the pooled ones do (AttnGAN projects
            # regions with its own 1x1 conv)
            self.region_head = ProjectionHead(self.image_tower.num_features, embed_dim, "linear")
            self.word_head = ProjectionHead(self.text_tower.num_features, embed_dim, "linear")

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> Embeddings:
        pooled_i, regions = self._image_features(batch)
        pooled_t, words, word_mask = self.text_tower(batch["input_ids"], batch["attention_mask"])
        emb = Embeddings(image=self.image_head(pooled_i), text=self.text_head(pooled_t))
        if self.with_variance:
            emb.image_ln_std = self.image_var(pooled_i)
            emb.text_ln_std = self.text_var(pooled_t)
        if self.with_local:
            emb.regions = self.region_head(regions)
            emb.words = self.word_head(words)
            emb.word_mask = word_mask
        meta = batch.get("meta") or {}
        if "groups" in self.loss.needs and "image_group" in meta:
            emb.image_groups = meta["image_group"]
            emb.text_groups = meta["text_group"]
        if "relevance" in self.loss.needs and "relevance" in meta:
            emb.relevance = meta["relevance"]
        if "ids" in self.loss.needs:  # per-item state (gcl) is keyed by the rows' identities
            emb.image_ids, emb.text_ids = item_ids(meta, emb.batch_size, emb.image.device)
        if self._teacher is not None:
            emb.teacher_image, emb.teacher_text = self._teacher.features(batch, emb.image)
        return emb

    def _image_features(self, batch: dict) -> tuple[Tensor, Tensor]:
        """The image tower's ``(pooled, regions)`` for the batch; in eval mode each distinct image once.

        A validation batch holds every caption of its images (five per image in the synthetic world and
        in Flickr), so running the tower per row would embed the same pixels five times. In eval mode
        each image's features depend on that image alone (no dropout, norms on running statistics), so
        embedding each distinct image once gives bit-identical outputs. Rows count as one image only when
        ``meta["image_id"]`` says so *and* their pixels are equal, so a reused id can never hand one
        image's features to another."""
        images = batch["image"]
        ids = (batch.get("meta") or {}).get("image_id")
        if not self.training and isinstance(ids, Tensor) and ids.shape == images.shape[:1]:
            first, inverse = first_occurrences(ids.to(images.device), return_inverse=True)
            if len(first) < len(ids) and torch.equal(images[first][inverse], images):
                pooled, regions = self.image_tower(images[first])
                return pooled[inverse], regions[inverse]
        return self.image_tower(images)

    # -- open_clip's interface ---------------------------------------------------------------------------
    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """``[N, 3, H, W]`` images (normalised like the loader's) -> ``[N, embed_dim]`` float32 embeddings,
        L2-normalised unless ``normalize=False``. open_clip's signature, so tools written for open_clip
        models (CLIP_benchmark's evaluators) run on this module."""
        pooled, _ = self.image_tower(images.to(self.device))
        out = self.image_head(pooled).float()
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, tokens: Tensor, attention_mask: Optional[Tensor] = None, normalize: bool = True) -> Tensor:
        """``[N, L]`` token ids -> ``[N, embed_dim]`` float32 embeddings, L2-normalised unless
        ``normalize=False``. Without ``attention_mask`` every non-padding token is real (open_clip's
        tokenizers return ids only)."""
        tokens = tokens.to(self.device)
        if attention_mask is None:
            attention_mask = (tokens != self.hparams.pad_token_id).long()
        pooled, _, _ = self.text_tower(tokens, attention_mask.to(self.device))
        out = self.text_head(pooled).float()
        return F.normalize(out, dim=-1) if normalize else out

    # -- steps ---------------------------------------------------------------------------------------------
    def _compute_loss(self, emb: Embeddings, batch: Optional[dict] = None, stage: str = "train"):
        # The loss runs in float32 outside autocast: logits of scale 100 and log-sum-exps over thousands
        # of columns lose too much in bf16/fp16 (a peer pitfall: NaN after the first step).
        with torch.autocast(self.device.type, enabled=False):
            try:
                return self.loss(emb.map(lambda t: t.float() if t.is_floating_point() else t))
            except NonFiniteError as e:
                # the loss names the tensor; the user needs the step, the family and what to do
                raise FloatingPointError(self._non_finite_message(f"non-finite features ({e})", batch, stage)) from e

    def _non_finite_message(self, what: str, batch: Optional[dict], stage: str) -> str:
        keys = list(((batch or {}).get("meta") or {}).get("key", []))[:4]
        return (f"{stage} step at global step {self.global_step}, loss family {self.hparams.loss!r}: {what}"
                + (f" (batch keys {keys}...)" if keys else "")
                + f". Training diverged or the data holds such values: lower model.lr (now {self.hparams.lr:g}), "
                "check the data (do these samples decode to sane images?), or use trainer.precision "
                "bf16-mixed instead of 16-mixed")

    def _check_finite(self, out, batch: dict, stage: str) -> None:
        if not torch.isfinite(out.loss):
            # fail loudly instead of letting AdamW spread NaN through every weight
            raise FloatingPointError(self._non_finite_message(f"loss is {float(out.loss)}", batch, stage))

    def _loss(self, batch: dict, stage: str):
        emb = self(batch)
        out = self._compute_loss(emb, batch, stage)
        self._check_finite(out, batch, stage)
        return emb, out

    def _count_false_negatives(self, batch: dict) -> None:
        """Share of the off-diagonal (image i, caption j != i) pairs of this batch that the oracle finds
        relevant, added to the run's running mean. Within one batch: under GradCache or DDP the loss also
        sees pairs across batches, which no batch's matrix covers. The loader computes it
        (``meta["false_negative_share"]``, from ``meta["relevance"]``)."""
        share = (batch.get("meta") or {}).get("false_negative_share")
        if share is None:
            return
        # a tensor sum, not a float: no device sync in the training step (the log call reads it)
        self._false_negative_sum = self._false_negative_sum + share
        self._false_negative_batches += 1

    def training_step(self, batch: dict, batch_idx: int) -> Optional[Tensor]:
        self._count_false_negatives(batch)
        if not self.automatic_optimization:
            return self._gradcache_step(batch)
        emb, out = self._loss(batch, "train")
        self._log_train(out, emb.batch_size)
        return out.loss

    def _log_train(self, out, bs: int) -> None:
        if not logging_step(self._trainer):
            # Training values are logged on_step only, so only what the logger writes is ever seen, and
            # each self.log call costs time in every step. (A callback monitoring train/loss sees it
            # every log_every_n_steps, and at the last step.)
            return
        self.log("train/loss", out.loss, prog_bar=True, batch_size=bs)
        for name, value in out.terms.items():
            self.log(f"train/loss/{name}", value, batch_size=bs)
        # the scale is logged once, by the temperature callback (temperature/scale, log_scale, bias)
        if self._false_negative_batches:
            # the mean over every training batch so far, so the last value is the run's average
            self.log("train/false_negatives", self._false_negative_sum / self._false_negative_batches,
                     batch_size=bs)

    # -- GradCache: negatives beyond one micro-batch ------------------------------------------------
    @staticmethod
    def _rng_state() -> tuple:
        return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    @staticmethod
    def _set_rng_state(state: tuple) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state_all(state[1])

    def _backward(self, tensor: Tensor) -> None:
        # through Lightning when attached to a trainer (precision plugins, DDP hooks), plain otherwise
        if self._trainer is not None:
            self.manual_backward(tensor)
        else:
            tensor.backward()

    def gradcache_backward(self, cached: list[tuple[dict, tuple]]):
        """Back-propagate one loss over several micro-batches, holding one micro-batch's graph at a time.

        `cached` holds (batch, rng_state) pairs, the RNG state taken before that batch was first seen.
        Peak memory is one micro-batch's activations plus the k*B embeddings.
        """
        # 1. embeddings of every micro-batch, without graph
        with torch.no_grad():
            parts = []
            for b, state in cached:
                self._set_rng_state(state)
                parts.append(self(b))
        after = self._rng_state()
        # 2. the loss over all k*B pairs, with the embeddings as leaves
        fields = [f for f, v in vars(parts[0]).items() if v is not None]
        full = Embeddings(**{f: torch.cat([getattr(p, f) for p in parts]) for f in fields})
        leaves = full.map(lambda t: t.detach().requires_grad_() if t.is_floating_point() else t)
        out = self._compute_loss(leaves, cached[0][0], "train")
        self._check_finite(out, cached[0][0], "train")
        self._backward(out.loss)  # grads of the loss' own parameters and of the embedding leaves
        grads = {f: getattr(leaves, f).grad for f in fields if getattr(leaves, f).is_floating_point()}
        # 3. replay each micro-batch with graph (same RNG: same dropout) and push the cached gradients in
        start = 0
        for (b, state), part in zip(cached, parts):
            n = part.batch_size
            self._set_rng_state(state)
            emb = self(b)
            surrogate = sum((getattr(emb, f) * g[start:start + n]).sum() for f, g in grads.items() if g is not None)
            self._backward(surrogate)
            start += n
        self._set_rng_state(after)
        return out, full.batch_size

    def _gradcache_step(self, batch: dict) -> Optional[Tensor]:
        """Collect k micro-batches; on the k-th, one loss over all of them and one optimizer step."""
        self._cache.append((batch, self._rng_state()))
        if len(self._cache) < self.hparams.negatives_from:
            return None
        cached, self._cache = self._cache, []
        out, n = self.gradcache_backward(cached)
        opt = self.optimizers()
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        self.loss.clamp_()
        self._log_train(out, n)
        return out.loss.detach()

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        emb, out = self._loss(batch, "val")
        self.log("val/loss", out.loss, prog_bar=True, batch_size=emb.batch_size, sync_dist=True)
        return {"loss": out.loss, "emb": emb.map(lambda t: t.detach().float() if t.is_floating_point() else t),
                "meta": batch.get("meta", {})}

    def on_validation_epoch_end(self) -> None:
        # Nothing is dropped silently: bad samples skipped by the loader so far (train and val, all
        # workers of this process), summed over ranks.
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "skipped"):
            self.log("data/skipped", float(dm.skipped), reduce_fx="sum", sync_dist=True)

    # -- resume: the running statistics live outside the state dict -----------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["false_negatives"] = {"sum": float(self._false_negative_sum),
                                         "batches": int(self._false_negative_batches)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("false_negatives")
        if saved:  # a Python float is a float64: the same additions as the uninterrupted run's tensor sum
            self._false_negative_sum = float(saved["sum"])
            self._false_negative_batches = int(saved["batches"])

    def optimizer_step(self, *args, **kwargs):  # automatic optimisation only
        super().optimizer_step(*args, **kwargs)
        self.loss.clamp_()

    # -- optimisation ------------------------------------------------------------------------------------
    def build_optimizer(self) -> torch.optim.AdamW:
        """The AdamW this module trains with (`configure_optimizers` adds the schedule): two groups, decay
        and no decay. Benchmarks build their hand-written reference loop with it too."""
        decay, no_decay = [], []
        loss_no_decay = {f"loss.{n}" for n in self.loss.no_decay}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            # CLIP's recipe: no decay on gains, biases, embeddings, and above all not on the learned
            # temperature, which decay would pull toward scale 1.
            if p.ndim < 2 or name in loss_no_decay or "embeddings" in name or "norm" in name.lower():
                no_decay.append(p)
            else:
                decay.append(p)
        hp = self.hparams
        # The fused kernel (CPU and CUDA): the CPU default is a Python loop of several small ops per
        # parameter tensor; fused is one kernel per tensor, same maths. Trainable parameters are floats.
        fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
        return torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=tuple(hp.betas),
                                 fused=fused or None)

    def configure_optimizers(self):
        hp = self.hparams
        opt = self.build_optimizer()
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, total // 2)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
