"""Engine replicas on Ray Serve behind fastinfer's OpenAI server, with prefix-aware routing.

Needs the ``ray`` extra (``pip install 'fastinfer[ray]'``). ``deploy_replicas`` is what
``fastinfer serve --replicas N`` runs; ``build_openai_app`` builds a whole Ray Serve application
for users who compose their own. See ``app`` (deployments), ``replica`` (one engine replica),
``router`` (``PrefixAwareRouter``), ``directory`` (which replica caches which blocks) and
``client`` (the replicas seen as one ``AsyncEngine``).
"""
