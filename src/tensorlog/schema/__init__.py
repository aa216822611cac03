"""The on-disk formats: file names (:mod:`.names`), vLLM's json files (:mod:`.vllm_json`) and
tensorlog's typed records (:mod:`.records`). The writer and every reader use these; nothing else
spells a file name or a record key."""
