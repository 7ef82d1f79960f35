#!/usr/bin/env python3
"""The transformers side of `medr1 bench`: the same shapes on the same device, for the ratio.

Builds Qwen2VLForConditionalGeneration from a config.json with random weights (no download),
then times GRPO steps after a warm-up, computed the way TRL's GRPOTrainer computes them (every
prompt and its image repeated --num-generations times in every pass):
  rollout  `generate` of --new-tokens sampled tokens (temperature 1, no early stop) for --batch
           prompts (each one --image-size square image plus --prompt-len text tokens) x
           --num-generations rows;
  step     the rollout, the reference model's log-probs (no grad), the policy's log-probs, the
           GRPO loss with the k3 KL penalty (beta 0.04), backward, clip 1.0, AdamW: TRL's
           per-token log-probs (logits of the completion only, `logits_to_keep`);
and the peak allocated GPU memory of each. The reference model is a second copy of the weights,
as in TRL. --threads sets torch's CPU threads (give medr1 the same: RAYON_NUM_THREADS).

  --precision bf16  weights, gradients and AdamW state in bf16 (model.to(bfloat16));
  --precision amp   f32 weights and AdamW state, bf16 autocast: what medr1's bf16 mode keeps
                    (f32 master weights; pure bf16 weights do not move at lr 1e-6).

Run it where medr1's bench runs, with the same arguments:
  python3 benches/reference/transformers_bench.py \
      --model-config tests/fixtures/qwen2_vl_2b_instruct_config.json \
      --batch 2 --num-generations 4 --prompt-len 100 --image-size 448 --new-tokens 256
  medr1 bench --model-config tests/fixtures/qwen2_vl_2b_instruct_config.json \
      --device cuda --bf16 --batch 2 --num-generations 4 --prompt-len 100 --image-size 448 \
      --new-tokens 256 --json

--lora-r R trains PEFT adapters instead (as `medr1 bench --lora-r R`): the reference is then the
model with its adapters disabled, no second copy; the process's peak RSS is reported too.

Needs torch and transformers (not torchvision), and peft for --lora-r. Works on CPU too, with a tiny config, to check
the script itself.
"""

import argparse
import json
import resource
import time

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", required=True)
    p.add_argument("--batch", type=int, default=2, help="prompts per step, each with its own image")
    p.add_argument("--num-generations", type=int, default=4, help="completions per prompt")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--prompt-len", type=int, default=64, help="text tokens besides the image's")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed repetitions after one warm-up")
    p.add_argument("--precision", choices=["bf16", "amp", "f32"], default="bf16")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rollout-only", action="store_true",
                   help="time the rollout only (no reference copy, no update: the 2B model's f32 "
                        "training state does not fit 24 GiB, its decoding does)")
    p.add_argument("--lora-r", type=int, default=0,
                   help="train PEFT LoRA adapters of this rank (alpha 2r) on the text decoder's seven projections "
                        "instead of the whole model, the reference being the model with them disabled, as TRL does "
                        "(medr1 bench --lora-r); needs peft")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    a = parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with open(a.model_config) as f:
        raw = json.load(f)
    config = Qwen2VLConfig(**raw)
    config._attn_implementation = a.attn
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    t = time.time()
    model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=a.attn)
    model.to(a.device)
    if a.lora_r:
        from peft import LoraConfig, get_peft_model
        lora = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model, lora)
    print(f"built a random model in {time.time() - t:.1f}s", flush=True)

    vision = config.vision_config
    patch, merge = vision.patch_size, vision.spatial_merge_size
    side = a.image_size // (patch * merge) * merge
    image_tokens = side * side // (merge * merge) if a.image_size else 0
    ids = []
    if image_tokens:
        ids = [config.vision_start_token_id] + [config.image_token_id] * image_tokens + [config.vision_end_token_id]
    ids += [i % 200 + 32 for i in range(a.prompt_len)]
    rows = a.batch * a.num_generations
    input_ids = torch.tensor([ids] * rows, device=a.device)
    attention_mask = torch.ones_like(input_ids)
    extra = {}
    if image_tokens:
        dim = vision.in_channels * vision.temporal_patch_size * patch * patch
        # Each prompt its own pixels (as medr1 bench), repeated to its rows as TRL repeats them.
        n = side * side
        per_prompt = []
        for p in range(a.batch):
            values = ((torch.arange(n * dim) + 13 * p) % 97).float() / 97.0 - 0.5
            per_prompt += [values.reshape(n, dim)] * a.num_generations
        extra["pixel_values"] = torch.cat(per_prompt).to(a.device, dtype)
        extra["image_grid_thw"] = torch.tensor([[1, side, side]] * rows, device=a.device)
        # transformers 5 computes M-RoPE from these (the processor returns them): 1 = image.
        extra["mm_token_type_ids"] = (input_ids == config.image_token_id).int()
    autocast = torch.autocast(device_type=a.device.split(":")[0], dtype=torch.bfloat16, enabled=a.precision == "amp")

    gen = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=True, temperature=1.0,
               top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
    trained = [p for p in model.parameters() if p.requires_grad]
    if not a.rollout_only:
        if not a.lora_r:
            reference = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=a.attn)
            reference.load_state_dict(model.state_dict())
            reference.to(a.device).eval()
        optim = torch.optim.AdamW(trained, lr=1e-6, weight_decay=0.0)
    beta = 0.04

    def logps_of(m, full, completions, keep):
        inputs = dict(extra)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = (full == config.image_token_id).int()
        logits = m(input_ids=full, attention_mask=torch.ones_like(full), **inputs, logits_to_keep=keep + 1).logits
        logits = logits[:, :-1, :].float()
        return torch.log_softmax(logits, dim=-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)

    rollout_s, step_s = [], []
    rollout_peak = update_peak = float("nan")
    for i in range(a.steps + 1):
        if a.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sync(a.device)
        t = time.time()
        model.eval()
        with torch.no_grad(), autocast:
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **extra, **gen)
        sync(a.device)
        t_roll = time.time() - t
        if a.device.startswith("cuda"):
            rollout_peak = torch.cuda.max_memory_allocated() / 2**30
        completions = out[:, input_ids.shape[1]:]
        if a.rollout_only:
            if i > 0:
                rollout_s.append(t_roll)
                step_s.append(t_roll)
            continue
        full = torch.cat([input_ids, completions], dim=1)
        keep = completions.shape[1]
        advantages = torch.zeros(rows, device=a.device)  # rewards of random weights: all equal
        with torch.no_grad(), autocast:
            if a.lora_r:
                with model.disable_adapter():
                    ref = logps_of(model, full, completions, keep)
            else:
                ref = logps_of(reference, full, completions, keep)
        model.train()
        with autocast:
            logps = logps_of(model, full, completions, keep)
            ratio = torch.exp(logps - logps.detach())
            per_token = -(ratio * advantages.unsqueeze(1))
            kl = torch.exp(ref - logps) - (ref - logps) - 1
            loss = (per_token + beta * kl).mean(dim=1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        sync(a.device)
        if a.device.startswith("cuda"):
            update_peak = torch.cuda.max_memory_allocated() / 2**30
        if i > 0:
            rollout_s.append(t_roll)
            step_s.append(time.time() - t)

    def median(v):
        v = sorted(v)
        n = len(v)
        return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2

    r, s = median(rollout_s), median(step_s)
    params = sum(p.numel() for p in model.parameters())
    # Peak resident memory of the process (Linux reports KiB).
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "engine": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}",
        "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device,
        "threads": torch.get_num_threads(),
        "precision": a.precision, "attention": a.attn, "parameters": params,
        "prompts": a.batch, "num_generations": a.num_generations,
        "prompt_tokens": len(ids), "image_tokens": image_tokens, "new_tokens": a.new_tokens,
        "rollout_s": r, "rollout_tokens_per_s": rows * a.new_tokens / r,
        "step_s": s, "rollout_peak_gib": rollout_peak, "step_peak_gib": update_peak,
        "lora_r": a.lora_r, "trained_parameters": sum(p.numel() for p in trained), "peak_rss_gib": peak_rss,
    }
    print(f"device {result['device']} ({a.precision}, {a.attn}, {result['threads']} threads), model {params} "
          f"parameters, {a.batch} prompts x {a.num_generations} generations, prompt {len(ids)} tokens "
          f"({image_tokens} image + {a.prompt_len} text), {a.new_tokens} new tokens")
    print(f"rollout: {r:.3f} s, {result['rollout_tokens_per_s']:.1f} new tokens/s   (median of {len(rollout_s)}), "
          f"peak {rollout_peak:.2f} GiB")
    if a.rollout_only:
        print(f"rollout per new token (prefill included): {r / max(a.new_tokens, 1):.3f} s")
    else:
        print(f"GRPO step (rollout + reference and policy log-probs + backward + clip + AdamW): {s:.3f} s, "
              f"peak {update_peak:.2f} GiB")
    print(json.dumps(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
