"""What a run leaves behind and where it goes: the output-folder layout, merge into full weights, the Hub."""
