"""Helpers of ``benchmarks/peers.py``: QuEPT against peer quantizers on the same model and data.

``methods`` lists the methods as data, ``results`` holds the pure bookkeeping (bits per weight,
merging runs into the JSON, the markdown table, the plot), ``worker`` is the child process that
quantizes and evaluates one run, and ``rtn``, ``hqq``, ``gptq``, ``awq``, ``autoround`` and
``elastic`` adapt one method each. Peer libraries are imported only inside their adapter, in
the child.
"""
