"""Knowledge distillation: a student trained on the calibration text to match the
original model (the teacher).

Losses by task: logits (causal LM, classifier) get KL(teacher_T || student_T) x T^2,
weighted ``alpha`` against the hard next-token loss where the text is its own label;
embedding models get 1 - cosine of the final embeddings (the infer head's) plus the
MSE of the token states when both have the same width. The student is the model itself
(recovery after pruning), every k-th teacher block (``layers``, as DistilBERT was
initialised), or a smaller model from a directory.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from lmbatch.actors.layers import conv1d_as_linear
from lmbatch.actors.loading import load_model
from lmbatch.errors import UserError
from lmbatch.optimize.arch import layer_list
from lmbatch.optimize.calibrate import Batch, make_batches
from lmbatch.optimize.context import Context
from lmbatch.optimize.labels import divergence
from lmbatch.optimize.recipe import Distill

log = logging.getLogger("lmbatch")
PROGRESS_EVERY_S = 15.0  # as an infer job's progress line in a log


def apply_distill(
    model: PreTrainedModel, step: Distill, ctx: Context, where: str
) -> PreTrainedModel:
    student = _student(model, step, ctx, where)
    batches = make_batches(
        ctx.tokenizer, ctx.calibration, step.max_length, step.batch_size, ctx.device
    )
    train(student, ctx, batches, step, lambda s, b: distill_loss(s, b, step, ctx))
    return student.eval()


def train(
    student: nn.Module, ctx: Context, batches: list[Batch], step, loss_fn
) -> None:
    """AdamW over shuffled length-sorted batches, with pruning masks kept."""
    ctx.teacher.eval()
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=step.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / max(1, step.steps // 10))
    )
    rng = random.Random(0)
    order: list[int] = []
    name = type(step).__name__.lower()
    started = last = time.monotonic()
    for done in range(1, step.steps + 1):
        if not order:
            order = list(range(len(batches)))
            rng.shuffle(order)
        loss = loss_fn(student, batches[order.pop()])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ctx.apply_masks(student)
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S or done == step.steps:
            last = now  # the loss read (a GPU sync) only when it is printed
            log.info(progress_line(name, done, step.steps, loss.item(), now - started))
    student.eval()


def progress_line(name: str, done: int, total: int, loss: float, seconds: float) -> str:
    """One line of a training loop's progress, for a log: Ray forwards a task's lines
    to the driver, where a progress bar's redraws became one line each."""
    rate = done / seconds if seconds > 0 else 0.0
    eta = f"  ETA {(total - done) / rate:.0f}s" if rate and done < total else ""
    return f"{name}: step {done} of {total}  loss {loss:.4f}  {rate:.2f} steps/s{eta}"


def distill_loss(
    student: nn.Module, batch: Batch, step: Distill, ctx: Context
) -> torch.Tensor:
    with torch.no_grad():
        teacher = ctx.teacher(**batch, output_hidden_states=True)
    out = student(**batch, output_hidden_states=True)
    mask = batch["attention_mask"]
    if ctx.task == "embed":
        t_hidden, s_hidden = teacher.last_hidden_state, out.last_hidden_state
        t = F.normalize(ctx.embed.embedding(t_hidden, mask), dim=-1)
        s = F.normalize(ctx.embed.embedding(s_hidden, mask), dim=-1)
        loss = (1 - (t * s).sum(dim=-1)).mean()
        if step.loss in ("auto", "mse"):
            loss = loss + hidden_loss(teacher.hidden_states, out.hidden_states, mask)
        return loss
    temp = step.temperature
    t_logits, s_logits = teacher.logits, out.logits
    if ctx.task == "score":  # one distribution per real token
        keep = mask.reshape(-1).bool()
        t_logits = t_logits.reshape(-1, t_logits.shape[-1])[keep]
        s_logits = s_logits.reshape(-1, s_logits.shape[-1])[keep]
    if step.loss == "mse" or ctx.scores == "none":  # regression: the values
        soft = F.mse_loss(s_logits, t_logits)
    else:
        soft = divergence(s_logits / temp, t_logits / temp, ctx.scores).mean() * temp**2
    if ctx.task != "score" or step.alpha == 1.0:
        return soft
    labels = batch["input_ids"].masked_fill(mask == 0, -100)[:, 1:]
    logits = out.logits[:, :-1]
    hard = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return step.alpha * soft + (1 - step.alpha) * hard


def hidden_loss(teacher: tuple, student: tuple, mask: torch.Tensor) -> torch.Tensor:
    """MSE of every block's output, where student and teacher have the same depth
    and width (pruned or factorized students): layer-wise distillation keeps each
    block close to its original instead of only the end result. A shallower student
    matches its last block only."""
    m = mask.unsqueeze(-1).to(student[-1].dtype)
    pairs = (
        list(zip(teacher, student, strict=True))
        if len(teacher) == len(student)
        else [(teacher[-1], student[-1])]
    )
    losses = [F.mse_loss(s * m, t * m) for t, s in pairs if s.shape == t.shape]
    return torch.stack(losses).mean() if losses else torch.zeros((), device=mask.device)


def _student(
    model: PreTrainedModel, step: Distill, ctx: Context, where: str
) -> PreTrainedModel:
    if step.student:
        return _load_student(step.student, ctx, where)
    student = copy.deepcopy(model) if step.layers else model
    if step.layers:
        path, attr = layer_list(student, f"{where}.layers")
        layers = student.get_submodule(path)
        if step.layers >= len(layers):
            raise UserError(
                f"{where}.layers",
                f"{step.layers} is not fewer than the model's {len(layers)} blocks",
            )
        keep = np.unique(np.round(np.linspace(0, len(layers) - 1, step.layers)))
        kept = nn.ModuleList([layers[int(i)] for i in keep])
        for i, layer in enumerate(kept):
            for module in layer.modules():  # caches index blocks by position
                if hasattr(module, "layer_idx"):
                    module.layer_idx = i
        parent, _, child = path.rpartition(".")
        setattr(student.get_submodule(parent) if parent else student, child, kept)
        setattr(student.config, attr, len(kept))
        if hasattr(student.config, "layer_types"):
            student.config.layer_types = student.config.layer_types[: len(kept)]
        ctx.notes.append(f"student keeps teacher blocks {keep.astype(int).tolist()}")
    return student


def _load_student(path: str, ctx: Context, where: str) -> PreTrainedModel:
    """Loaded as any model is (an artifact rebuilt, weights checked), on the
    teacher's device, where its batches are; trained in fp32, whatever an artifact
    was saved in (load_model keeps an fp16 artifact in fp16)."""
    spec = replace(ctx.base, path=path, precision="fp32")
    student = load_model(spec, ctx.device).float()
    if student.config.vocab_size != ctx.teacher.config.vocab_size:
        raise UserError(
            f"{where}.student",
            f"vocabulary of {student.config.vocab_size} tokens differs from the "
            f"teacher's {ctx.teacher.config.vocab_size}; they must share a tokenizer",
        )
    width, teacher_width = student.config.hidden_size, ctx.teacher.config.hidden_size
    if ctx.task == "embed" and width != teacher_width:
        raise UserError(  # the artifact keeps the teacher's pooling and Dense modules
            f"{where}.student",
            f"hidden size {width} differs from the teacher's {teacher_width}; an "
            "embedding model's student must keep its width",
        )
    return conv1d_as_linear(student)  # a GPT-2's Conv1D, as student_of does
