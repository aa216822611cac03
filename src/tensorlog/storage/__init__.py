"""Storage: the writer that takes capture's work items off the model's thread and puts each step on disk.

Internal: the stages above hand it :mod:`.records` work items; :mod:`.writer` owns the threads, :mod:`.queue`
and :mod:`.arena` bound the memory, :mod:`.finisher` ends a step, :mod:`.atomic` makes each file whole or absent.
"""
