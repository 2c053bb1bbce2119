"""The result file of `randfeat eval`: typed records, their JSON codec, reading, writing, resuming.

- [randfeat.eval.results.records][]: the typed records of a result file (`Header`, `CleanRow`,
  `AttackRow`, ...).
- [randfeat.eval.results.codec][]: `Record`, frozen dataclasses that write and read JSON,
  checking types.
- [randfeat.eval.results.file][]: reading, writing and resuming a result file; the
  damaged-last-line rule. One writer at a time through [randfeat.eval.lock][].

Importing this package loads none of them; import the module you need.
"""
