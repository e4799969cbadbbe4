"""Quantization itself: the QDQ math and range observers, weight clipping, the layer
wrappers (`layers.QuantLayer`) and extra layer kinds (`kinds`: embeddings, RNNs, attention,
activation matmuls), the deploy target's integer arithmetic (`target`), and `QuantModel`,
the user's model copied with every quantizable layer wrapped (BN folded, shared modules
found, the data flow between layers traced)."""
