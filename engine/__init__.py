"""Finetune Studio's training engine: plain Python + torch/HF, never imports Gradio."""
