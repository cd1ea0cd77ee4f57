"""fill_grad on public models: the models of pytorch/examples and tiny Hugging Face models.

For each model, ForwardGradient(4) with the sim, jvp and loop engines and weight and activity
perturbation on a small random batch; prints per setting either the relative difference of the jvp
and loop estimates to sim's, or the error a setting stopped with, and a final JSON line.

- ``--examples DIR``: a checkout of https://github.com/pytorch/examples. The class and function
  definitions of its model files are executed (nothing else of those scripts runs); models:
  word_language_model (LSTM, GRU, Transformer), mnist_rnn, vae, super_resolution,
  time_sequence_prediction, dcgan (D, and G through D), fast_neural_style, gcn, gat, minGPT, Llama 2.
- ``--transformers``: tiny Hugging Face models from their configs (needs ``transformers``): BERT,
  GPT-2 (also with gradient checkpointing), ViT, T5, Llama, Mistral, DistilBERT, RoBERTa, ConvNeXt,
  Swin, ResNet; weight perturbation, and activity perturbation for BERT, GPT-2 and ViT.

    python benchmarks/studies/public_models.py --examples ../pytorch-examples [--transformers]
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple  # noqa: UP035 - names the executed example files use

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common

from _common import print_result

import frog

ENGINES = ("sim", "jvp", "loop")
B = 6  # batch


def definitions(path: Path, names: set[str] | None = None) -> dict:
    """The class and function definitions of a Python file (or those in ``names``), executed alone."""
    tree = ast.parse(path.read_text())
    keep = [n for n in tree.body if isinstance(n, ast.ClassDef | ast.FunctionDef) and (names is None or n.name in names)]
    namespace = {"torch": torch, "nn": nn, "F": F, "init": nn.init, "math": math, "dataclass": dataclass,
                 "Optional": Optional, "Tuple": Tuple, "Tensor": torch.Tensor}  # noqa: UP006
    exec(compile(ast.Module(keep, []), str(path), "exec"), namespace)  # noqa: S102 - the user's own checkout
    return namespace


def compare(name: str, build: Callable[[], nn.Module], loss: Callable[[nn.Module, str], torch.Tensor],
            perturbations=("weight", "activity"), dtype: torch.dtype | None = None) -> dict:
    """{perturbation: {engine: relative difference to sim, or the error}} for one model."""
    results = {}
    for perturbation in perturbations:
        reduction = "none" if perturbation == "activity" else "mean"
        estimates, row = {}, {}
        for engine in ENGINES:
            torch.manual_seed(0)
            model = build()
            model = (model.to(dtype) if dtype else model).train()
            try:
                torch.manual_seed(5)  # the step's random numbers (dropout), the same for every engine
                frog.ForwardGradient(4, engine=engine, perturbation=perturbation, seed=1).fill_grad(
                    model, lambda m, reduction=reduction: loss(m, reduction))
                estimates[engine] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            except Exception as error:  # noqa: BLE001 - reported, then the next setting
                row[engine] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        for engine, estimate in estimates.items():
            if engine != "sim" and "sim" in estimates:
                row[engine] = float((estimate - estimates["sim"]).norm() / estimates["sim"].norm().clamp_min(1e-30))
        results[perturbation] = row
        shown = ", ".join(f"{e} {v:.1e}" if isinstance(v, float) else f"{e} {v}" for e, v in row.items())
        print(f"{name:32s} {perturbation:8s} {shown or 'sim only'}", flush=True)
    return results


def per_sample(loss: torch.Tensor, reduction: str, rows: int = B) -> torch.Tensor:
    """Token losses (rows * T,) as per-sample means (rows,) for activity perturbation."""
    return loss.view(rows, -1).mean(1) if reduction == "none" else loss


def pytorch_examples(root: Path) -> dict:
    results = {}
    vocab, steps = 30, 7
    source, target = torch.randint(0, vocab, (steps, B)), torch.randint(0, vocab, (steps * B,))
    language = definitions(root / "word_language_model/model.py")
    for kind in ("LSTM", "GRU"):
        results[f"word_language_model {kind}"] = compare(
            f"word_language_model {kind}", lambda kind=kind: language["RNNModel"](kind, vocab, 16, 16, 2, 0.2, tie_weights=True),
            lambda m, r: F.nll_loss(m(source, m.init_hidden(B))[0].view(-1, vocab), target, reduction=r))
    results["word_language_model Transformer"] = compare(
        "word_language_model Transformer", lambda: language["TransformerModel"](vocab, 16, 2, 32, 2, 0.2),
        lambda m, r: F.nll_loss(m(source).view(-1, vocab), target, reduction=r))
    images, labels = torch.randn(B, 1, 28, 28), torch.randint(0, 10, (B,))
    results["mnist_rnn"] = compare("mnist_rnn", definitions(root / "mnist_rnn/main.py", {"Net"})["Net"],
                                   lambda m, r: F.nll_loss(m(images), labels, reduction=r))

    vae = definitions(root / "vae/main.py", {"VAE"})["VAE"]
    pixels = torch.rand(B, 784)

    def vae_loss(m, r):
        recon, mu, logvar = m(pixels)
        total = F.binary_cross_entropy(recon, pixels, reduction="none").sum(1) \
            - 0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
        return total if r == "none" else total.sum()

    results["vae"] = compare("vae", vae, vae_loss)
    low, high = torch.randn(B, 1, 8, 8), torch.randn(B, 1, 24, 24)
    results["super_resolution"] = compare(
        "super_resolution", lambda: definitions(root / "super_resolution/model.py")["Net"](3),
        lambda m, r: per_sample(F.mse_loss(m(low), high, reduction=r), r))
    sequence = torch.randn(B, 20, dtype=torch.float64)
    results["time_sequence_prediction"] = compare(
        "time_sequence_prediction", definitions(root / "time_sequence_prediction/train.py", {"Sequence"})["Sequence"],
        lambda m, r: per_sample(F.mse_loss(m(sequence[:, :-1]), sequence[:, 1:], reduction=r), r), dtype=torch.float64)

    dcgan = definitions(root / "dcgan/main.py", {"Generator", "Discriminator", "weights_init"})
    dcgan.update(nz=8, ngf=4, ndf=4, nc=3)

    def network(kind: str) -> nn.Module:
        model = dcgan[kind](0)
        model.apply(dcgan["weights_init"])
        return model

    real, noise, ones = torch.randn(B, 3, 64, 64), torch.randn(B, 8, 1, 1), torch.ones(B)
    results["dcgan D"] = compare("dcgan D", lambda: network("Discriminator"),
                                 lambda m, r: F.binary_cross_entropy(m(real).view(-1), ones, reduction=r))
    torch.manual_seed(1)
    discriminator = network("Discriminator")
    results["dcgan G through D"] = compare(
        "dcgan G through D", lambda: network("Generator"),
        lambda m, r: F.binary_cross_entropy(discriminator(m(noise)).view(-1), ones, reduction=r))
    style = torch.randn(2, 3, 32, 32)
    results["fast_neural_style"] = compare(
        "fast_neural_style", definitions(root / "fast_neural_style/neural_style/transformer_net.py")["TransformerNet"],
        lambda m, r: per_sample(F.mse_loss(m(style), style, reduction=r), r, rows=2))

    nodes = 12
    adjacency = (torch.rand(nodes, nodes, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    adjacency = ((adjacency + adjacency.T + torch.eye(nodes)) > 0).float()
    adjacency = adjacency / adjacency.sum(1, keepdim=True)
    features, classes = torch.randn(nodes, 5), torch.randint(0, 3, (nodes,))
    gcn = definitions(root / "gcn/main.py", {"GraphConv", "GCN"})
    results["gcn (sparse adjacency)"] = compare("gcn (sparse adjacency)", lambda: gcn["GCN"](5, 8, 3),
                                                lambda m, r: F.nll_loss(m(features, adjacency.to_sparse()), classes, reduction=r))
    gat = definitions(root / "gat/main.py", {"GraphAttentionLayer", "GAT"})
    results["gat"] = compare("gat", lambda: gat["GAT"](in_features=5, n_hidden=8, n_heads=2, num_classes=3),
                             lambda m, r: F.nll_loss(m(features, adjacency), classes, reduction=r))

    tokens, next_tokens = torch.randint(0, vocab, (B, 8)), torch.randint(0, vocab, (B, 8))
    gpt = definitions(root / "distributed/minGPT-ddp/mingpt/model.py")
    config = gpt["GPTConfig"](n_layer=2, n_head=2, n_embd=16, vocab_size=vocab, block_size=8, model_type=None)
    results["minGPT"] = compare("minGPT", lambda: gpt["GPT"](config), lambda m, r: per_sample(
        F.cross_entropy(m(tokens)[0].view(-1, vocab), next_tokens.view(-1), reduction=r), r))
    llama = definitions(root / "distributed/tensor_parallelism/llama2_model.py")
    arguments = llama["ModelArgs"](dim=16, n_layers=2, n_heads=2, vocab_size=vocab, max_batch_size=B,
                                   max_seq_len=16, multiple_of=8)
    results["Llama 2"] = compare("Llama 2", lambda: llama["Transformer"](arguments), lambda m, r: per_sample(
        F.cross_entropy(m(tokens).reshape(-1, vocab), next_tokens.view(-1), reduction=r), r))
    return results


def hugging_face() -> dict:
    import transformers as hf

    vocab, length = 64, 8
    ids, labels, pixels = torch.randint(0, vocab, (3, length)), torch.randint(0, 3, (3,)), torch.randn(3, 3, 32, 32)
    text = {"vocab_size": vocab}
    lm = lambda m, r: m(input_ids=ids, labels=ids).loss
    classify = lambda m, r: m(input_ids=ids, labels=labels).loss
    vision = lambda m, r: F.cross_entropy(m(pixel_values=pixels).logits, labels, reduction=r)
    small = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}

    def gpt2(checkpointing: bool | None = None) -> nn.Module:
        model = hf.GPT2LMHeadModel(hf.GPT2Config(**text, n_embd=16, n_layer=2, n_head=2, n_positions=16))
        if checkpointing is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        return model

    def gpt2_tokens(m, r):
        return F.cross_entropy(m(input_ids=ids).logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction=r)

    weight_only = ("weight",)
    cases = {
        "HF BERT": (lambda: hf.BertForSequenceClassification(hf.BertConfig(**text, hidden_size=32, num_labels=3, **small)),
                    lambda m, r: F.cross_entropy(m(input_ids=ids).logits, labels, reduction=r), ("weight", "activity")),
        "HF GPT-2": (gpt2, gpt2_tokens, ("weight", "activity")),
        "HF GPT-2, checkpointing": (lambda: gpt2(False), gpt2_tokens, weight_only),
        "HF GPT-2, reentrant checkpointing": (lambda: gpt2(True), gpt2_tokens, weight_only),
        "HF ViT": (lambda: hf.ViTForImageClassification(hf.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                                                      num_labels=3, **small)), vision, ("weight", "activity")),
        "HF T5": (lambda: hf.T5ForConditionalGeneration(hf.T5Config(**text, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                                     num_heads=2, decoder_start_token_id=0)), lm, weight_only),
        "HF Llama": (lambda: hf.LlamaForCausalLM(hf.LlamaConfig(**text, hidden_size=16, num_key_value_heads=1,
                                                                max_position_embeddings=32, **small)), lm, weight_only),
        "HF Mistral": (lambda: hf.MistralForCausalLM(hf.MistralConfig(**text, hidden_size=16, num_key_value_heads=1,
                                                                      max_position_embeddings=32, **small)), lm, weight_only),
        "HF DistilBERT": (lambda: hf.DistilBertForSequenceClassification(hf.DistilBertConfig(
            **text, dim=16, hidden_dim=32, n_layers=2, n_heads=2, num_labels=3)), classify, weight_only),
        "HF RoBERTa": (lambda: hf.RobertaForMaskedLM(hf.RobertaConfig(**text, hidden_size=16, max_position_embeddings=40,
                                                                      **small)), lm, weight_only),
        "HF ConvNeXt": (lambda: hf.ConvNextForImageClassification(hf.ConvNextConfig(
            hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3)), vision, weight_only),
        "HF Swin": (lambda: hf.SwinForImageClassification(hf.SwinConfig(
            image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=3)),
            vision, weight_only),
        "HF ResNet": (lambda: hf.ResNetForImageClassification(hf.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)), vision, weight_only),
    }
    return {name: compare(name, build, loss, perturbations) for name, (build, loss, perturbations) in cases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=Path, help="a checkout of github.com/pytorch/examples")
    parser.add_argument("--transformers", action="store_true", help="also tiny Hugging Face models")
    args = parser.parse_args()
    if args.examples is None and not args.transformers:
        parser.error("give --examples DIR (a checkout of pytorch/examples) and/or --transformers")
    if args.examples is not None and not (args.examples / "word_language_model/model.py").exists():
        parser.error(f"{args.examples} is not a checkout of pytorch/examples (no word_language_model/model.py)")
    warnings.simplefilter("ignore")
    print(f"{'model':32s} {'perturb.':8s} relative difference to sim, or the error")
    results = {}
    if args.examples is not None:
        results.update(pytorch_examples(args.examples))
    if args.transformers:
        results.update(hugging_face())
    print_result("public_models", results=results)


if __name__ == "__main__":
    main()
