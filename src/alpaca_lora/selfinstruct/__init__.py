"""Self-instruct: new Alpaca records written by a teacher model from a few seed tasks (Wang et al. 2022).

:func:`alpaca_lora.selfinstruct.pipeline.self_instruct` runs the loop; the other modules are its parts:
seed tasks, the prompt and its parser, the filters, the ROUGE-L similarity index, the teachers (a local
model folder or an OpenAI-compatible endpoint) and the resumable output file.
"""
