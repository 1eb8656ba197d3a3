"""Answer one prompt with a base model and with the same model plus a trained adapter.

Run by the web app's playground as a subprocess, so model weights never live in the web process:

    python -m engine.chat --model_id ./model --adapter runs/<id>/output --prompt "Hi" [--chat true]

Prints one JSON line: {"base": "...", "tuned": "..."}. Greedy decoding, so answers repeat exactly
and a difference between the two comes from the adapter alone.
"""

import argparse
import json
import sys

from engine.config import parse_bool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_id", required=True, help="base model: hub id or folder")
    parser.add_argument("--adapter", required=True, help="folder holding adapter_config.json (a run's output)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", type=parse_bool, default=True,
                        help="true: wrap the prompt as a user turn with the chat template; false: raw text")
    parser.add_argument("--chat_template", default=None, help="the run's chat_template, if it set one")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args(argv)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.data import setup_chat_template

    tokenizer = AutoTokenizer.from_pretrained(args.adapter)  # the run saved the tokenizer it trained with
    if args.chat:
        setup_chat_template(tokenizer, args.chat_template)
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = tokenizer.bos_token + args.prompt if tokenizer.bos_token else args.prompt
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else (torch.float16 if cuda else torch.float32)
    base = AutoModelForCausalLM.from_pretrained(args.model_id, dtype=dtype, device_map="auto" if cuda else None)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(base.device)

    def answer() -> str:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    tuned = answer()
    with model.disable_adapter():
        base_answer = answer()
    print(json.dumps({"base": base_answer, "tuned": tuned}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
