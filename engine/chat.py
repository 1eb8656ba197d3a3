"""Answer prompts with a base model and with the same model plus a trained adapter.

Once, from a shell:

    python -m engine.chat --model_id ./model --adapter runs/<id>/output --prompt "Hi" [--chat true]

prints one JSON line, {"base": "...", "tuned": "..."}, and exits. Without --prompt it is a worker,
as the web app's playground runs it: the models load once, then each line read on stdin, a JSON
request {"prompt": "...", "max_new_tokens": 64}, gets one JSON line on stdout, the answers or
{"error": "..."}; end of input ends it. Greedy decoding, so answers repeat exactly and a difference
between the two comes from the adapter alone.
"""

import argparse
import json
import os
import sys
from collections.abc import Iterable
from typing import TextIO

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.config import parse_bool
from engine.data import setup_chat_template


class Chat:
    """A base model with a run's adapter, loaded once, answering with the adapter on and off."""

    def __init__(self, model_id: str, adapter: str, chat: bool = True, chat_template: str | None = None):
        self.chat = chat
        self.tokenizer = AutoTokenizer.from_pretrained(adapter)  # the run saved the tokenizer it trained with
        if chat:
            setup_chat_template(self.tokenizer, chat_template)
        cuda = torch.cuda.is_available()
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
        base = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, device_map="auto" if cuda else None)
        self.model = PeftModel.from_pretrained(base, adapter).eval()

    def answer(self, prompt: str, max_new_tokens: int = 64) -> dict[str, str]:
        """{"base": ..., "tuned": ...}: the prompt answered without and with the adapter."""
        tokenizer = self.tokenizer
        if self.chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        else:
            text = tokenizer.bos_token + prompt if tokenizer.bos_token else prompt
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        tuned = self._generate(inputs, max_new_tokens)
        with self.model.disable_adapter():
            base = self._generate(inputs, max_new_tokens)
        return {"base": base, "tuned": tuned}

    def _generate(self, inputs, max_new_tokens: int) -> str:
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def serve(chat: Chat, requests: Iterable[str], replies: TextIO, max_new_tokens: int = 64) -> None:
    """One JSON reply line for each JSON request line, flushed at once: the asker waits on it."""
    for line in requests:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("prompt"), str):
                raise ValueError('a request is one JSON object a line, like {"prompt": "Hi", "max_new_tokens": 64}')
            reply = chat.answer(request["prompt"], int(request.get("max_new_tokens", max_new_tokens)))
        except Exception as e:  # one bad request must not end the worker: say why, wait for the next
            reply = {"error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_id", required=True, help="base model: hub id or folder")
    parser.add_argument("--adapter", required=True, help="folder holding adapter_config.json (a run's output)")
    parser.add_argument("--prompt", default=None, help="answer this once and exit; without it, serve stdin")
    parser.add_argument("--chat", type=parse_bool, default=True,
                        help="true: wrap the prompt as a user turn with the chat template; false: raw text")
    parser.add_argument("--chat_template", default=None, help="the run's chat_template, if it set one")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="the default when a request names none")
    args = parser.parse_args(argv)

    if args.prompt is not None:
        chat = Chat(args.model_id, args.adapter, args.chat, args.chat_template)
        print(json.dumps(chat.answer(args.prompt, args.max_new_tokens)))
        return 0
    # Replies get stdout to themselves: whatever a library prints there (from Python or C) goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(Chat(args.model_id, args.adapter, args.chat, args.chat_template), sys.stdin, replies, args.max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
