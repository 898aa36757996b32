# The split-count loop behind decode_splits_h200.log (run as: PYTHONPATH=. python results/logs/decode_splits_h200.py).
import torch, triton.testing
from sparseflash.nn import KVCache
from sparseflash.decode import decode_attention
from sparseflash.bench.timing import cuda_graph_of
dev=torch.device("cuda"); B,H,D,L,nb,W=1,8,64,65536,16,256
for B in (1,8):
    g=torch.Generator(device=dev).manual_seed(0)
    q=torch.randn(B,H,1,D,device=dev,dtype=torch.bfloat16,generator=g)
    c=KVCache(L,kernel=True); c.append(torch.randn(B,H,L,D,device=dev,dtype=torch.bfloat16,generator=g),torch.randn(B,H,L,D,device=dev,dtype=torch.bfloat16,generator=g),torch.randint(0,nb,(B,H,L),device=dev,generator=g),n_buckets=nb)
    qb=torch.randint(0,nb,(B,H),device=dev,generator=g)
    ref=decode_attention(q,c.k,c.v,c.length,key_index=c.bucket_rows,n_keys=c.bucket_count,list_id=qb,window=W,num_splits=1).float()
    out=[]
    for s in (1,2,4,8,16,32,64,128,256):
        f=lambda: decode_attention(q,c.k,c.v,c.length,key_index=c.bucket_rows,n_keys=c.bucket_count,list_id=qb,window=W,num_splits=s)
        err=(f().float()-ref).abs().max().item()
        ms=triton.testing.do_bench(cuda_graph_of(f,dev).replay,warmup=5,rep=20,return_mode="median")
        out.append(f"{s}:{ms*1e3:.1f}us(e{err:.0e})")
    print("B",B," ".join(out),flush=True)
