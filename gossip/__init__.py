"""seedswarm.gossip"""
