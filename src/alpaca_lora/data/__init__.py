"""Instruction data, from records on disk to a micro-batch: read, template, tokenize and mask, pack, sample."""
