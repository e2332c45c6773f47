"""An SR of this plugin: a directory of qcow2 images with durable
metadata, shared by the volume plugin (``SR.*``, ``Volume.*``) and the
datapath (which serves the images): the layout and records
(:mod:`~xapi_storage_tasks.sr.directory`), the images' backing chains
(:mod:`~xapi_storage_tasks.sr.chain`) and ``qemu-img``
(:mod:`~xapi_storage_tasks.sr.images`)."""
