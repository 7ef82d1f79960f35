#!/usr/bin/env python3
"""The transformers side of `medr1 bench`: the same shapes on the same device, for the ratio.

Builds Qwen2VLForConditionalGeneration from a config.json with random weights (no download),
then measures, after a warm-up:
  rollout  `generate` of --new-tokens sampled tokens (temperature 1, no early stop) for --batch
           copies of a prompt of one --image-size square image plus --prompt-len text tokens;
  update   forward + backward + AdamW over prompt + completion, the loss being the mean
           completion log-prob, computed as TRL's GRPO does (logits of the completion only);
and the peak allocated GPU memory of each.

  --precision bf16  weights, gradients and AdamW state in bf16 (model.to(bfloat16));
  --precision amp   f32 weights and AdamW state, bf16 autocast: what medr1's bf16 mode keeps
                    (f32 master weights; pure bf16 weights do not move at lr 1e-6).

Run it where medr1's bench runs, with the same arguments:
  python3 benches/reference/transformers_bench.py \
      --model-config tests/fixtures/qwen2_vl_2b_instruct_config.json \
      --batch 8 --prompt-len 100 --image-size 448 --new-tokens 256
  medr1 bench --model-config tests/fixtures/qwen2_vl_2b_instruct_config.json \
      --device cuda --bf16 --batch 8 --prompt-len 100 --image-size 448 --new-tokens 256

Needs torch and transformers (not torchvision). Works on CPU too, with a tiny config, to check
the script itself.
"""

import argparse
import json
import time

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64, help="text tokens besides the image's")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed repetitions after one warm-up")
    p.add_argument("--precision", choices=["bf16", "amp", "f32"], default="bf16")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    a = parse()
    torch.manual_seed(0)
    with open(a.model_config) as f:
        raw = json.load(f)
    config = Qwen2VLConfig(**raw)
    config._attn_implementation = a.attn
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    t = time.time()
    model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=a.attn)
    model.to(a.device)
    print(f"built a random model in {time.time() - t:.1f}s", flush=True)

    vision = config.vision_config
    patch, merge = vision.patch_size, vision.spatial_merge_size
    side = a.image_size // (patch * merge) * merge
    image_tokens = side * side // (merge * merge) if a.image_size else 0
    ids = []
    if image_tokens:
        ids = [config.vision_start_token_id] + [config.image_token_id] * image_tokens + [config.vision_end_token_id]
    ids += [i % 200 + 32 for i in range(a.prompt_len)]
    input_ids = torch.tensor([ids] * a.batch, device=a.device)
    attention_mask = torch.ones_like(input_ids)
    extra = {}
    if image_tokens:
        dim = vision.in_channels * vision.temporal_patch_size * patch * patch
        n = side * side * a.batch
        values = (torch.arange(n * dim, dtype=torch.float32) % 97) / 97.0 - 0.5
        extra["pixel_values"] = values.reshape(n, dim).to(a.device, dtype)
        extra["image_grid_thw"] = torch.tensor([[1, side, side]] * a.batch, device=a.device)
        # transformers 5 computes M-RoPE from these (the processor returns them): 1 = image.
        extra["mm_token_type_ids"] = (input_ids == config.image_token_id).int()
    autocast = torch.autocast(device_type=a.device.split(":")[0], dtype=torch.bfloat16, enabled=a.precision == "amp")

    # Rollouts: sampled, exactly --new-tokens each (no EOS stop).
    model.eval()
    gen = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=True, temperature=1.0,
               top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
    rollout_s, completions = [], None
    for i in range(a.steps + 1):
        if a.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sync(a.device)
        t = time.time()
        with torch.no_grad(), autocast:
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **extra, **gen)
        sync(a.device)
        if i > 0:
            rollout_s.append(time.time() - t)
        completions = out[:, input_ids.shape[1]:]
    rollout_peak = torch.cuda.max_memory_allocated() / 2**30 if a.device.startswith("cuda") else float("nan")

    # Updates: TRL's per-token log-probs of the completion, mean, backward, AdamW.
    model.train()
    full = torch.cat([input_ids, completions], dim=1)
    full_mask = torch.ones_like(full)
    keep = completions.shape[1]
    optim = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    step_s = []
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(a.steps + 1):
        sync(a.device)
        t = time.time()
        with autocast:
            inputs = dict(extra)
            if "mm_token_type_ids" in inputs:
                inputs["mm_token_type_ids"] = (full == config.image_token_id).int()
            logits = model(input_ids=full, attention_mask=full_mask, **inputs, logits_to_keep=keep + 1).logits
            logits = logits[:, :-1, :].float()
            logps = torch.log_softmax(logits, dim=-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
            loss = -logps.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        sync(a.device)
        if i > 0:
            step_s.append(time.time() - t)
    update_peak = torch.cuda.max_memory_allocated() / 2**30 if a.device.startswith("cuda") else float("nan")

    r = sum(rollout_s) / len(rollout_s)
    s = sum(step_s) / len(step_s)
    params = sum(p.numel() for p in model.parameters())
    result = {
        "engine": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}",
        "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device,
        "precision": a.precision, "attention": a.attn, "parameters": params,
        "batch": a.batch, "prompt_tokens": len(ids), "image_tokens": image_tokens, "new_tokens": a.new_tokens,
        "rollout_s": r, "rollout_tokens_per_s": a.batch * a.new_tokens / r,
        "update_s": s, "update_tokens_per_s": a.batch * (len(ids) + a.new_tokens) / s,
        "rollout_peak_gib": rollout_peak, "update_peak_gib": update_peak,
    }
    print(f"device {result['device']} ({a.precision}, {a.attn}), model {params} parameters, batch {a.batch}, "
          f"prompt {len(ids)} tokens ({image_tokens} image + {a.prompt_len} text), {a.new_tokens} new tokens")
    print(f"rollout: {r:.3f} s, {result['rollout_tokens_per_s']:.1f} tokens/s   (mean of {len(rollout_s)}), "
          f"peak {rollout_peak:.2f} GiB")
    print(f"train step (forward + backward + clip + AdamW): {s:.3f} s, {result['update_tokens_per_s']:.1f} tokens/s, "
          f"peak {update_peak:.2f} GiB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
