"""The volume plugin: ``SR.*`` and ``Volume.*`` on SRs of this plugin
(:mod:`xapi_storage_tasks.sr`), whose volumes the datapath serves."""
