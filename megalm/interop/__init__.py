"""Checkpoint converters, a layer of their own: training and generation never import them. Hugging Face
(``hf.py`` moves files, ``families/`` holds one class per model family) and Megatron-LM (``megatron.py`` maps
names and args, ``megatron_format.py`` reads and writes its files)."""
