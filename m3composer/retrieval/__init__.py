"""m3composer.retrieval"""
