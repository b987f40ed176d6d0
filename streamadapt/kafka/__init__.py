"""streamadapt/kafka"""
